"""SmolLM2-135M-Instruct, the real model: conversion, greedy generation and prompt logprobs
against transformers (float32)."""
import pytest
import torch

from fp8lm import LLM, SamplingParams
from fp8lm.model.loader import load_model
from reference import full_logits

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def llm(smollm2):
    return LLM(str(smollm2), max_model_len=512, skip_warmup=True)


def test_conversion_matches_transformers_gguf_loader(smollm2):
    """transformers dequantizes the GGUF and un-permutes q/k by itself: an independent check."""
    from transformers import AutoModelForCausalLM

    from fp8lm.model.registry import gguf_file

    path = gguf_file("smollm2-135m-instruct")
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = [1, 504, 3575, 282, 4649, 314, 216, 30, 28, 3110, 28, 216, 31, 28, 216, 32]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    ours = full_logits(load_model(smollm2, torch.float32), ids)
    # float32 over 30 layers with logits up to ~35: differences are summation-order rounding only.
    assert (ours - expected).abs().max().item() < 2e-4


def test_folder_has_hf_layout(smollm2):
    import json

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (smollm2 / name).is_file()
    assert "chat_template" in json.loads((smollm2 / "tokenizer_config.json").read_text())


def test_greedy_tokens_equal_transformers_generate(llm, smollm2_hf):
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=32)  # both stop at EOS, which both include
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([tok.encode(prompt)])
        ref = smollm2_hf.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
        assert out.outputs[0].token_ids == ref.tolist(), prompt
    assert max(len(o.outputs[0].token_ids) for o in outs) == 32


def test_prompt_logprobs_match_transformers(llm, smollm2_hf):
    text = "Paris is the capital and most populous city of France, with an estimated population of two million."
    out = llm.generate(text, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    with torch.no_grad():
        ref = torch.log_softmax(smollm2_hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    worst = max(abs(entry[ids[i]].logprob - ref[i - 1, ids[i]].item())
                for i, entry in enumerate(out.prompt_logprobs) if entry is not None)
    assert worst < 1e-4


def test_loading_does_not_regress(smollm2):
    import time

    start = time.perf_counter()
    load_model(smollm2, torch.float32)
    assert time.perf_counter() - start < 30  # the 10 s target is a benchmark figure, this only catches regressions
