"""Tensor parallelism on the CPU (gloo): fp8lm starts the other ranks itself."""
import os
import signal
import subprocess
import sys
import time

import openai
import pytest
import torch

from fp8lm import LLM, SamplingParams
from fp8lm.errors import FP8LMError
from fp8lm.eval.perplexity import compare, read_text, token_windows
from fp8_noise import perturb_embeddings

PROMPTS = [[int(t) for t in torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (6, 19, 31)]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)


def test_tiny_tp2_equals_tp1(tiny_model):
    one = LLM(str(tiny_model), max_model_len=64, skip_warmup=True)
    # A KV cache sized from free memory: both ranks run the profile step first.
    two = LLM(str(tiny_model), max_model_len=64, tensor_parallel_size=2, kv_cache_memory=0.01)
    try:
        assert two.engine.host.model.model.layers[0].self_attn.q_proj.out_features == 32   # half the heads
        assert two.engine.step_peak_bytes is not None
        a = one.generate(PROMPTS, GREEDY, use_tqdm=False)
        b = two.generate(PROMPTS, GREEDY, use_tqdm=False)
        for x, y in zip(a, b):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids
            for ex, ey in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
                for t in ex:
                    assert abs(ex[t].logprob - ey[t].logprob) < 1e-4
        w = PROMPTS[2]
        assert (one.engine.score(w) - two.engine.score(w)).abs().max() < 1e-4
    finally:
        two.engine.shutdown()


def listening_addresses(pid: int) -> set[str]:
    """The local addresses of the TCP sockets process `pid` listens on (from /proc: no tools needed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:      # LISTEN
                found.add(fields[1].split(":")[0])
    return found


def test_tensor_parallel_ranks_listen_on_loopback_only(tiny_model, monkeypatch):
    """Ranks fp8lm starts itself meet at a store listening on 127.0.0.1 only (on a port held from
    the start) and talk over gloo sockets on loopback, even where gloo was told another interface."""
    import socket

    from fp8lm.engine.parallel import LocalRendezvous

    rendezvous = LocalRendezvous(2)
    assert rendezvous.listener.getsockname()[0] == "127.0.0.1"
    rendezvous.listener.close()
    others = [name for _, name in socket.if_nameindex() if not name.startswith("lo")]
    if others:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", others[0])       # inherited by the spawned rank too
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    two = LLM(str(tiny_model), max_model_len=64, tensor_parallel_size=2, skip_warmup=True, kv_cache_memory=1 << 20)
    try:
        pids = [os.getpid()] + [p.pid for p in two.engine.workers]
        addresses = {pid: listening_addresses(pid) for pid in pids}
        assert addresses[os.getpid()] and all(a <= loopback for a in addresses.values()), addresses
    finally:
        two.engine.shutdown()


def test_indivisible_sizes_are_refused(tiny_model):
    with pytest.raises(FP8LMError, match="tensor_parallel_size=3 does not divide num_attention_heads=4"):
        LLM(str(tiny_model), tensor_parallel_size=3)


@pytest.mark.slow
def test_smollm2_tp3_equals_tp1_and_tp2_is_refused(smollm2):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    one = [o.outputs[0].token_ids for o in LLM(str(smollm2), max_model_len=256, skip_warmup=True)
           .generate(prompts, params, use_tqdm=False)]
    three = LLM(str(smollm2), max_model_len=256, tensor_parallel_size=3, skip_warmup=True)
    try:
        assert [o.outputs[0].token_ids for o in three.generate(prompts, params, use_tqdm=False)] == one
    finally:
        three.engine.shutdown()
    with pytest.raises(FP8LMError, match=r"tensor_parallel_size=2 does not divide num_attention_heads=9, "
                                         r"num_key_value_heads=3"):
        LLM(str(smollm2), tensor_parallel_size=2)


@pytest.mark.slow
def test_fp8_calibrate_tp3_quantize_unify_tp1(smollm2, tmp_path):
    from fp8lm.entrypoints.calibrate import calibrate
    from fp8lm.quant.unify import unify_measurements

    # No continuation beyond max_tokens (statistics_tokens=0): the per-rank files are what is tested.
    cal = calibrate(str(smollm2), "builtin", tmp_path, num_samples=8, max_seq_len=128, max_tokens=4,
                    use_tqdm=False, tensor_parallel_size=3, statistics_tokens=0)
    assert sorted(p.name for p in tmp_path.glob("inc_output_hooks_maxabs_*_3.json")) == [
        f"inc_output_hooks_maxabs_{r}_3.json" for r in range(3)]
    fp8 = dict(quantization="inc", quant_config=str(cal.quant_config), kv_cache_dtype="fp8_inc",
               max_model_len=256, skip_warmup=True)
    three = LLM(str(smollm2), tensor_parallel_size=3, **fp8)
    try:
        unify_measurements(tmp_path / "inc_output", 1)
        one, perturbed = LLM(str(smollm2), **fp8), LLM(str(smollm2), **fp8)
        perturb_embeddings(perturbed, 1e-6)
        windows = token_windows(one.get_tokenizer(), read_text(None), 256)[:6]
        result, floor = compare(one.engine, three.engine, windows), compare(one.engine, perturbed.engine, windows)
    finally:
        three.engine.shutdown()
    # The ranks agree on one activation scale per module (the maximum over ranks), which is what
    # unify gives TP=1; what remains is the all-reduce's summation order, and FP8 turns any such
    # difference into a whole other rounding of the model (tests/fp8_noise.py): TP=3 may be as far
    # from TP=1 as TP=1 is from itself perturbed by 1e-6, no further. A wrong shard scale or a missed
    # all-reduce adds to that floor.
    assert floor.mean_kl > 0.01, floor.summary()
    assert result.mean_kl < 1.25 * floor.mean_kl, (result.summary(), floor.summary())


COLLECTIVE_TIMEOUT_S = 3     # FP8LM_TP_COLLECTIVE_TIMEOUT_S for the servers below (default 30)


@pytest.fixture(scope="module")
def tp3_model(tmp_path_factory):
    """The tiny model with heads and MLP that three ranks divide."""
    from conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tp3") / "llama", hidden_size=96, intermediate_size=192,
                           num_attention_heads=6, num_key_value_heads=3)


@pytest.fixture(scope="module")
def tp1_answer(tp3_model):
    """What one process answers PROMPT (greedy), for the TP=3 servers to give again."""
    llm = LLM(str(tp3_model), max_model_len=256, skip_warmup=True)
    return llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0].text


def start_tp3_server(model):
    """`fp8lm serve` at TP=3, healthy; returns the process, an openai client and the worker pids."""
    from server_util import free_port

    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fp8lm", "serve", str(model), "--port", str(port),
                             "--tensor-parallel-size", "3", "--max-model-len", "256", "--served-model-name", "tp3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "FP8LM_SKIP_WARMUP": "1",
                                 "FP8LM_TP_COLLECTIVE_TIMEOUT_S": str(COLLECTIVE_TIMEOUT_S)})
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.5)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
    children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
    workers = [c for c in children if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
    assert len(workers) == 2
    return proc, client, workers


def running(pids):
    return [c for c in pids if os.path.exists(f"/proc/{c}") and "zombie" not in open(f"/proc/{c}/status").read().lower()]


PROMPT = "The capital of France is"


def answer(client):
    return client.completions.create(model="tp3", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text


def test_serve_tp3_survives_idle_time_and_dies_with_a_worker(tp3_model, tp1_answer):
    """Idle ranks wait for rank 0 past gloo's collective timeout (here 3 s): the server answers after
    twice that without traffic (what one process answers); a rank killed afterwards still ends it
    within 30 s, naming the rank."""
    proc, client, workers = start_tp3_server(tp3_model)
    try:
        assert answer(client) == tp1_answer
        time.sleep(2 * COLLECTIVE_TIMEOUT_S)
        assert proc.poll() is None and answer(client) == tp1_answer
        os.kill(workers[0], signal.SIGKILL)
        proc.wait(30)
        out = proc.stdout.read()
        assert proc.returncode == 2 and "the server stopped: tensor-parallel worker fp8lm-tp-rank1" in out, out[-2000:]
        time.sleep(1)
        assert not running(workers)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tp_workers_exit_when_rank0_is_killed(tp3_model, tp1_answer):
    proc, client, workers = start_tp3_server(tp3_model)
    try:
        assert answer(client) == tp1_answer
        proc.kill()                                   # SIGKILL: rank 0 runs no handler
        proc.wait(10)
        deadline = time.monotonic() + 15
        while running(workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not running(workers)
    finally:
        for pid in running(workers):
            os.kill(pid, signal.SIGKILL)


def test_torchrun_launch_equals_single_process(tiny_model):
    """Across hosts torchrun starts the ranks (env:// rendezvous); on one host it checks the same path."""
    env = {**os.environ, "FP8LM_SKIP_WARMUP": "1"}
    args = ["generate", str(tiny_model), "--prompt", "Hello", "--max-tokens", "8"]
    single = subprocess.run([sys.executable, "-m", "fp8lm", *args], capture_output=True, text=True, env=env,
                            timeout=120)
    from server_util import free_port

    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", str(free_port()), "-m", "fp8lm", *args, "--tensor-parallel-size", "2"],
                              capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0 and launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stdout == single.stdout


def test_a_worker_that_fails_to_start_ends_rank_0_at_once(tiny_model, tmp_path):
    """A script without the `if __name__ == "__main__":` guard: each spawned rank re-runs it and
    fails while it starts. Rank 0 stops waiting for it (the store would wait RENDEZVOUS_TIMEOUT_S,
    300 s) and names the worker."""
    script = tmp_path / "unguarded.py"
    script.write_text(f"from fp8lm import LLM\nLLM({str(tiny_model)!r}, tensor_parallel_size=2, skip_warmup=True)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150)
    assert result.returncode != 0
    assert "tensor-parallel worker fp8lm-tp-rank1 exited with code 1 before joining rank 0" in result.stderr, \
        result.stderr[-2000:]
