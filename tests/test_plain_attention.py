"""An unquantized layer's attention in one scaled_dot_product_attention call (PlainAttention): the
numbers of its matmul, softmax and matmul modules, and the modules again wherever a hook observes them."""
import pytest
import torch

from conftest import make_tiny
from fp8lm import LLM, SamplingParams
from fp8lm.model.attention import PlainAttention

GEN = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
# float32 sums in another order: ~1e-7 relative per score, ~1e-6 on these logits (|logit| < ~10).
TOL = 1e-5


def prompt(n, seed):
    return torch.randint(3, 98, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(folder, prompts, **kw):
    """Greedy tokens with their top log-probs, and one prompt's logits: batched prompts of several
    lengths (padded queries), 32-token chunks over earlier chunks, decode steps, prefix-cache hits."""
    llm = LLM(str(folder), max_model_len=256, block_size=4, max_num_batched_tokens=32, skip_warmup=True, **kw)
    out = [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in e.items()} for e in o.outputs[0].logprobs])
           for o in llm.generate(prompts, GEN, use_tqdm=False)]
    return out, llm.engine.score(prompts[0])


def calls_of(monkeypatch) -> list:
    calls = []
    call = PlainAttention.__call__
    monkeypatch.setattr(PlainAttention, "__call__", lambda self, *a: calls.append(1) or call(self, *a))
    return calls


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_one_call_attention_equals_the_modules(tmp_path, monkeypatch, family):
    """gemma3_text: layer 0 attends over a window of 8 keys (the windowed layer's cut block tables
    and bias) at a scale that is not head_dim ** -0.5."""
    extra = dict(head_dim=32, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                 query_pre_attn_scalar=24, tie_word_embeddings=True) if family == "gemma3_text" else {}
    folder = make_tiny(tmp_path / family, family, seed=3, **extra)
    prompts = [prompt(70, 1), prompt(9, 2), prompt(40, 3), prompt(70, 1)[:50] + prompt(6, 4)]
    calls = calls_of(monkeypatch)
    fused, fused_logits = run(folder, prompts)
    assert calls
    monkeypatch.setattr(PlainAttention, "applies", lambda *a: False)
    calls.clear()
    modules, modules_logits = run(folder, prompts)
    assert not calls
    assert (fused_logits - modules_logits).abs().max() < TOL
    for (tokens_a, lps_a), (tokens_b, lps_b) in zip(fused, modules):
        assert tokens_a == tokens_b
        assert all(abs(a[t] - b[t]) < TOL for a, b in zip(lps_a, lps_b) for t in a)


def test_hooked_modules_run_themselves(tiny_model, monkeypatch):
    """An observer on any of the five modules (MEASURE's) sees every step: the one call stands aside."""
    calls = calls_of(monkeypatch)
    llm = LLM(str(tiny_model), max_model_len=64, skip_warmup=True)
    llm.engine.score(prompt(20, 5))
    assert calls
    attn = llm.engine.host.model.model.layers[1].self_attn.attn
    for module in (attn.matmul_qk, attn.softmax, attn.matmul_av, attn.k_cache, attn.v_cache):
        seen = []
        handle = module.register_forward_hook(lambda m, args, out: seen.append(1))
        calls.clear()
        llm.engine.score(prompt(20, 5))
        handle.remove()
        assert seen and len(calls) == 1, module      # layer 0 still runs in one call
