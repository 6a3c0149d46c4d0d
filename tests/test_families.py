"""Qwen2, Qwen3, Mistral, Phi-3 and Gemma 3 (and Llama) against transformers on tiny random models saved by
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
    # Layer 0 windowed, each layer type its own rotary base; attention scaled by 24 ** -0.5, not head_dim's.
    "gemma3_text": dict(head_dim=32, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                        query_pre_attn_scalar=24, tie_word_embeddings=True),
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
                "mistral": (False, False, False, (8, 8)), "phi3": (False, False, False, (8, 8)),
                "gemma3_text": (False, False, True, (8, None))}[name]
    assert (config.qkv_bias, config.o_bias, config.qk_norm, config.layer_windows) == expected
    if name == "qwen3":
        assert config.head_dim == 24 != config.hidden_size // config.num_attention_heads
    gemma = name == "gemma3_text"
    assert (config.norm_adds_one, config.sandwich_norms, config.activation) == (gemma, gemma, "gelu_tanh" if gemma else "silu")
    if gemma:
        assert (config.rope_theta, config.local_rope_theta, config.attn_scale) == (10000.0, 100.0, 24 ** -0.5)
        assert config.embed_scale == 64 ** 0.5 and config.tie_word_embeddings


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
    windowed = [m for m in llm.engine.host.model.modules() if getattr(m, "sliding_window", None)]
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


def test_options_the_decoder_lacks_are_refused_by_name(tmp_path):
    import json

    base = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4}
    for arch, extra, named in (("LlamaForCausalLM", {"hidden_act": "relu"}, "'relu'"),
                               ("Gemma3ForCausalLM", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
                               ("Gemma3ForCausalLM", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
                               ("Gemma3ForCausalLM", {"use_bidirectional_attention": True}, "bidirectional")):
        (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch], **base, **extra}))
        with pytest.raises(ModelLoadError, match=named):
            ModelConfig.from_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"], **base}))
    config = ModelConfig.from_folder(tmp_path)    # transformers' Gemma 3 defaults: GeGLU, 256 ** -0.5, tied, bases
    assert (config.activation, config.attn_scale, config.tie_word_embeddings) == ("gelu_tanh", 1 / 16, True)
    assert (config.rope_theta, config.local_rope_theta) == (1_000_000.0, 10_000.0)


def test_fp8_flow(family, tmp_path):
    """calibrate -> QUANTIZE (everything FP8, FP8 KV) -> generate; then a Linear-only `fp8lm quantize`
    folder that transformers loads and runs as fp8lm does."""
    import json

    from transformers import AutoModelForCausalLM

    from fp8lm.entrypoints.calibrate import calibrate
    from fp8lm.entrypoints.quantize import quantize_to_folder
    from fp8lm.eval.perplexity import compare
    from fp8lm.quant.fp8_linear import FP8Panels, is_fp8

    name, folder, _ = family
    cal = calibrate(str(folder), "builtin", tmp_path / "cal", num_samples=8, max_seq_len=64, max_tokens=4,
                    use_tqdm=False)
    fp8 = engine_llm(folder, quantization="inc", quant_config=str(cal.quant_config), kv_cache_dtype="fp8_inc")
    linears = [m for m in fp8.engine.host.model.modules() if is_fp8(m)]
    assert len(linears) == 2 * 7 and all(isinstance(m.format, FP8Panels) for m in linears)
    attn = fp8.engine.host.model.model.layers[0].self_attn
    fusable = attn.q_proj.out_features % 32 == 0 and attn.k_proj.out_features % 32 == 0     # kernel panels
    assert (attn.q_proj.fused is not None) == fusable          # q/k/v as one call, bias too
    windows = [PROMPT, list(range(3, 90))]
    result = compare(engine_llm(folder).engine, fp8.engine, windows)
    print(name, "FP8 vs float32:", result.summary())
    assert result.mean_kl < 0.02, result.summary()
    assert len(greedy(fp8)) == 20
    nodes = json.loads((tmp_path / "cal" / "inc_output_hooks_maxabs.json").read_text())["Nodes"]
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.gate_proj",
            "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.attn.k_cache"} <= set(nodes)   # INC's names

    config = json.loads(cal.quant_config.read_text())
    config["blocklist"] = {"types": ["Matmul", "Softmax", "KVCache"], "names": []}
    out = quantize_to_folder(str(folder), tmp_path / "fp8", config, kv_cache_dtype="auto")
    written = json.loads((out / "config.json").read_text())
    if name == "phi3":
        from safetensors import safe_open
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert "model.layers.0.self_attn.qkv_proj.weight" in f.keys()
            assert not any(".q_proj." in k or ".gate_proj." in k for k in f.keys())
    assert written["architectures"] == json.loads((folder / "config.json").read_text())["architectures"]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = engine_llm(out)
    folder_result = compare(ours.engine, _Scorer(hf), windows)
    print(name, "fp8lm vs transformers on the FP8 folder:", folder_result.summary())
    assert folder_result.mean_kl < 1e-3, folder_result.summary()


class _Scorer:
    """transformers' model behind engine.score's contract (logits predicting tokens 1..n-1)."""

    def __init__(self, hf):
        self.hf = hf

    def score(self, ids):
        return hf_logits(self.hf, ids)[:-1]


def test_fp8_tensor_parallel(family, tmp_path):
    """MEASURE and QUANTIZE at TP=2 (biases and q/k norms sharded or replicated as in float)."""
    from fp8lm.entrypoints.calibrate import calibrate
    from fp8lm.eval.perplexity import compare

    name, folder, _ = family
    cal = calibrate(str(folder), "builtin", tmp_path, num_samples=8, max_seq_len=64, max_tokens=4, use_tqdm=False,
                    tensor_parallel_size=2)
    two = engine_llm(folder, tensor_parallel_size=2, quantization="inc", quant_config=str(cal.quant_config),
                     kv_cache_dtype="fp8_inc")
    try:
        result = compare(engine_llm(folder).engine, two.engine, [PROMPT, list(range(3, 90))])
        assert len(greedy(two)) == 20
    finally:
        two.engine.shutdown()
    print(name, "FP8 at TP=2 vs float32:", result.summary())
    assert result.mean_kl < 0.02, result.summary()


# Without windows: llama.cpp runs qwen2 and llama-architecture (Mistral) GGUFs with full attention.
GGUF_FAMILIES = {"llama": {}, "qwen2": {}, "qwen3": dict(head_dim=24), "mistral": dict(sliding_window=None),
                 "phi3": dict(sliding_window=8),
                 # llama.cpp's fixed Gemma 3 settings: every 6th layer global, local rotary base 10,000,
                 # scores scaled by head_dim ** -0.5.
                 "gemma3_text": dict(head_dim=32, sliding_window=8, num_hidden_layers=6, query_pre_attn_scalar=32,
                                     tie_word_embeddings=True)}


@pytest.mark.parametrize("model_type", GGUF_FAMILIES)
def test_gguf_in_llama_cpp_layout_loads_the_same(model_type, tmp_path):
    from gguf_writer import ARCH, write_gguf

    from fp8lm.model.gguf_convert import convert_gguf

    folder = make_tiny(tmp_path / "hf", model_type, seed=2, **GGUF_FAMILIES[model_type])
    gguf_path = write_gguf(folder, tmp_path / "model.gguf")
    converted = convert_gguf(gguf_path, tmp_path / "converted")
    assert ModelConfig.from_folder(converted).architecture == ModelConfig.from_folder(folder).architecture \
        or (ARCH[model_type] == "llama" and model_type == "mistral")        # llama.cpp stores Mistral as llama
    ids = list(range(3, 60))
    ours = full_logits(load_model(converted, torch.float32), ids)
    assert (ours - full_logits(load_model(folder, torch.float32), ids)).abs().max() < 1e-5
    llm = LLM(str(converted), max_model_len=64, skip_warmup=True)
    chat = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                               tokenize=False)
    assert chat == "user: hi\nassistant: "                                  # the GGUF's chat template


def test_served_chat_uses_the_family_model(family):
    """`fp8lm serve` on the family's folder: the chat answer equals offline greedy generation."""
    import openai

    from server_util import running_server

    name, folder, _ = family
    messages = [{"role": "user", "content": "hi"}]
    offline = LLM(str(folder), max_model_len=128, skip_warmup=True)
    prompt = offline.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0].text
    with running_server(str(folder), "--max-model-len", "128", "--served-model-name", name) as proc:
        client = openai.OpenAI(base_url=f"{proc.base_url}/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == expected
