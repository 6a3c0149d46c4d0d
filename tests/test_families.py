"""Qwen2, Qwen3, Mistral and Phi-3 (and Llama) against transformers on tiny random models saved by
transformers: logits, greedy generation, tensor parallelism, sliding windows, GGUF, FP8."""
import pytest
import torch

from conftest import make_tiny
from fp8lm import LLM, SamplingParams
from fp8lm.errors import ModelLoadError
from fp8lm.model.config import ModelConfig
from fp8lm.model.loader import load_model
from reference import full_logits

# Windows of 8 keys with 4-token blocks: prompts of 40 tokens cut blocks out of windowed layers.
FAMILIES = {
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),   # layer 1 windowed
    "qwen3": dict(head_dim=24, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "mistral": dict(sliding_window=8),
    "phi3": dict(sliding_window=8),
}
PROMPT = torch.randint(3, 98, (40,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp(request.param) / "model", request.param, seed=1,
                       **FAMILIES[request.param])
    from transformers import AutoModelForCausalLM

    return request.param, folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def engine_llm(folder, **kw):
    return LLM(str(folder), max_model_len=128, block_size=4, skip_warmup=True, **kw)


def test_model_logits_match_transformers(family):
    name, folder, hf = family
    ref = hf_logits(hf, PROMPT)
    assert ref.std() > 0.1
    assert (full_logits(load_model(folder, torch.float32), PROMPT) - ref).abs().max() < 1e-4


def test_family_options_are_read(family):
    name, folder, _ = family
    config = ModelConfig.from_folder(folder)
    expected = {"qwen2": (True, False, False, (None, 8)), "qwen3": (False, False, True, (None, 8)),
                "mistral": (False, False, False, (8, 8)), "phi3": (False, False, False, (8, 8))}[name]
    assert (config.qkv_bias, config.o_bias, config.qk_norm, config.layer_windows) == expected
    if name == "qwen3":
        assert config.head_dim == 24 != config.hidden_size // config.num_attention_heads


def greedy(llm, n=20):
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return out[0].outputs[0].token_ids


def hf_greedy(hf, n=20):
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("tp", [1, 2])
def test_engine_matches_transformers(family, tp):
    """Scores (prefill over the paged cache, windowed layers reading only their blocks) to 1e-4 and
    greedy generation (decode) token for token, at TP=1 and TP=2 (heads 4, KV heads 2)."""
    name, folder, hf = family
    llm = engine_llm(folder, tensor_parallel_size=tp)
    try:
        ref = hf_logits(hf, PROMPT)
        assert (llm.engine.score(PROMPT) - ref[:-1]).abs().max() < 1e-4
        assert greedy(llm) == hf_greedy(hf)
    finally:
        llm.engine.shutdown()


def test_windowed_layers_skip_blocks_outside_the_window(family):
    name, folder, _ = family
    llm = engine_llm(folder)
    seen = []
    windowed = [m for m in llm.engine.model.modules() if getattr(m, "sliding_window", None)]
    windowed[0].register_forward_pre_hook(lambda m, args: seen.append(args[3].for_window(8).block_tables.shape[1]))
    greedy(llm, 4)
    # 40 prompt tokens in 4-token blocks: 10 blocks; a decode query at position 40 with 8 keys reads
    # positions 33..40 -> 3 blocks (8..10); the prompt's first query (position 0) reads them all.
    assert seen[0] == 10 and max(seen[1:]) <= 3, seen


def test_unsupported_architectures_name_what_is_missing(tmp_path):
    import json

    for arch, extra, missing in (("Qwen2MoeForCausalLM", {"num_experts": 8}, "mixture-of-experts"),
                                 ("DeepseekV3ForCausalLM", {"kv_lora_rank": 512}, "multi-head latent attention"),
                                 ("GPT2LMHeadModel", {}, None)):
        (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch], **extra}))
        with pytest.raises(ModelLoadError) as e:
            ModelConfig.from_folder(tmp_path)
        text = str(e.value)
        assert arch in text and "Qwen3ForCausalLM" in text and "Phi3ForCausalLM" in text
        assert missing is None or missing in text
