"""Scoring through /v1/completions as lm-eval's `local-completions` does it: echo + logprobs return
the prompt tokens' logprobs (the first one null), checked against transformers' own logits."""
import openai
import pytest
import torch

from server_util import running_server

IDS = torch.randint(3, 98, (40,), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.fixture(scope="module")
def client(tiny_model):
    with running_server(str(tiny_model), "--served-model-name", "tiny") as proc:
        yield openai.OpenAI(base_url=f"{proc.base_url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        lps = torch.log_softmax(hf(torch.tensor([IDS])).logits[0], -1)
    return [float(lps[i, IDS[i + 1]]) for i in range(len(IDS) - 1)]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_returns_the_prompt_logprobs(client, reference, max_tokens):
    r = client.completions.create(model="tiny", prompt=IDS, echo=True, logprobs=1, max_tokens=max_tokens,
                                  temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(IDS) + max_tokens and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    got = lp.token_logprobs[1:len(IDS)]
    assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-4
    if max_tokens:
        assert lp.token_logprobs[-1] is not None and len(r.choices[0].text) > 0


def test_streamed_echo_starts_with_the_prompt_logprobs(client, reference):
    chunks = list(client.completions.create(model="tiny", prompt=IDS, echo=True, logprobs=1, max_tokens=2,
                                            temperature=0, stream=True))
    first = chunks[0].choices[0].logprobs
    assert first.token_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(first.token_logprobs[1:len(IDS)], reference)) < 1e-4


def test_max_tokens_0_needs_echo(client):
    with pytest.raises(openai.BadRequestError, match="only allowed with echo"):
        client.completions.create(model="tiny", prompt=IDS, max_tokens=0)


def test_tokenize_and_detokenize_as_vllm_answers(client, tiny_model):
    import httpx

    from fp8lm import LLM

    base = str(client.base_url).removesuffix("/v1/")
    tok = LLM(str(tiny_model), max_model_len=64, skip_warmup=True).get_tokenizer()
    r = httpx.post(f"{base}/tokenize", json={"model": "tiny", "prompt": "hello there"}).json()
    assert r["tokens"] == tok.encode("hello there") and r["count"] == len(r["tokens"]) and r["max_model_len"]
    chat = httpx.post(f"{base}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tok.encode("user: hi\nassistant: ", add_special_tokens=False)
    assert httpx.post(f"{base}/detokenize", json={"tokens": r["tokens"]}).json()["prompt"].endswith("hello there")
    assert httpx.post(f"{base}/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert httpx.post(f"{base}/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404


def test_prompt_logprobs_field_in_vllm_s_shape(client, reference):
    """vLLM's `prompt_logprobs` extra field: per prompt token null (the first) or {token id: {logprob,
    rank, decoded_token}} holding the prompt token and the top-k; completions per choice, chat at the top."""
    r = client.completions.create(model="tiny", prompt=IDS, max_tokens=1, temperature=0,
                                  extra_body={"prompt_logprobs": 2}).model_dump()
    entries = r["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(IDS) and entries[0] is None
    for i, entry in enumerate(entries[1:]):
        token = entry[str(IDS[i + 1])]
        assert abs(token["logprob"] - reference[i]) < 1e-4 and token["rank"] >= 1
        assert 2 <= len(entry) <= 3 and sorted(e["rank"] for e in entry.values())[:2] == [1, 2]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                          extra_body={"prompt_logprobs": 0}).model_dump()
    assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
