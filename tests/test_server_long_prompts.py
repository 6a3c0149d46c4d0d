"""Long prompts served at --max-model-len 8192: in chunks beside running streams, bounded memory,
and the prefix cache on a resent 3,000-token prompt. The model has SmolLM2-135M's layer shape (9
query heads over 3 KV heads of 64, hidden 576, MLP 1,536) in two layers instead of thirty: a chunk's
attention memory and the share of a prefill that one chunk takes are those of SmolLM2, at a
fifteenth of its time."""
import threading
import time

import httpx
import pytest
import torch

from conftest import make_tiny_llama
from server_util import running_server
from test_server import metric

CHUNK = 1024


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("smol-shaped") / "llama", hidden_size=576, intermediate_size=1536,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)


@pytest.fixture(scope="module")
def vocab_size(long_model):
    import json

    return json.loads((long_model / "config.json").read_text())["vocab_size"]


def ids(n, seed, vocab_size):
    return torch.randint(3, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def server(long_model):
    with running_server(str(long_model), "--max-model-len", "8192", "--served-model-name", "smol",
                        "--max-num-batched-tokens", str(CHUNK), timeout=300) as proc:
        yield proc


def complete(server, prompt, **kw):
    r = httpx.post(f"{server.base_url}/v1/completions", timeout=600,
                   json={"model": "smol", "prompt": prompt, "max_tokens": 1, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def peak_rss(server) -> int:
    for line in open(f"/proc/{server.pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_7000_token_prompt_in_bounded_memory(server, vocab_size):
    """Prefill attention in 256-query blocks over 1,024-token chunks: per layer at most
    3 KV heads x 3 heads x 256 x 7,000 float32 scores (65 MB) and as many probabilities, plus the
    chunk's mask (1,024 x 7,000, 29 MB) — not 7,000 x 7,000 x 9 (1.8 GB)."""
    complete(server, ids(200, 1, vocab_size))
    before = peak_rss(server)
    complete(server, ids(7000, 2, vocab_size))
    assert peak_rss(server) - before < 400 * 2**20, (peak_rss(server) - before) / 2**20


def test_the_prefix_cache_serves_a_resent_prompt(server, vocab_size):
    prompt = ids(3000, 3, vocab_size)
    hits = metric(server.base_url, "vllm:prefix_cache_hits_total")
    start = time.monotonic()
    first = complete(server, prompt, logprobs=5)
    middle = time.monotonic()
    second = complete(server, prompt, logprobs=5)
    end = time.monotonic()
    assert metric(server.base_url, "vllm:prefix_cache_hits_total") - hits >= 2976     # 186 of 16-token blocks
    assert end - middle < 0.3 * (middle - start), (end - middle, middle - start)
    a, b = (r["choices"][0]["logprobs"]["top_logprobs"][0] for r in (first, second))
    assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)


def test_streams_keep_flowing_while_a_long_prompt_prefills(server, vocab_size):
    """While a 4,000-token prompt prefills in chunks (256 tokens while streams decode, the CPU server's
    default), the running streams get a token every step: their longest gap is about one chunk's time, not the whole prefill's. Each stream
    runs through the prefill (a token after it ends), then leaves (closing aborts the rest)."""
    gaps: list[float] = []
    window, through = [float("inf"), float("inf")], []

    def stream():
        body = {"model": "smol", "prompt": "Tell me a long story.", "max_tokens": 6000, "ignore_eos": True,
                "stream": True}
        last = None
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                now = time.monotonic()
                if last is not None and window[0] <= now:
                    gaps.append(now - last)
                last = now
                if now > window[1]:
                    through.append(now)
                    return

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(2)
    window[0] = start = time.monotonic()
    complete(server, ids(4000, 4, vocab_size))
    window[1] = time.monotonic()
    prefill = window[1] - start
    for t in threads:
        t.join(120)
    assert len(through) == 2 and max(gaps) < 0.5 * prefill, (len(through), max(gaps), prefill)
