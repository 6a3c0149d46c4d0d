"""The whole-decoder decode step in one kernel call (quant/fused_decode.py) against the
layer-by-layer path it replaces: the same FP8 kernels, the glue (RMSNorm, rotary, residuals,
SiLU·up) in C++. Decode steps are teacher-forced over fixed tokens, so both paths see the same inputs."""
import dataclasses

import pytest
import torch

from conftest import measure_tiny
from fp8lm import LLM, SamplingParams
from fp8lm.engine.sequence import Sequence
from fp8lm.eval.perplexity import read_text
from fp8lm.quant.fused_decode import FusedDecodeStack, fuse_decode_steps
from fp8_noise import perturb_embeddings

PROMPTS = [[int(t) for t in torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (6, 19, 31, 11, 25)]


def decode_logits(llm, tokens: list[int]) -> torch.Tensor:
    """Logits after each of `tokens`, every one computed by a decode step (one new token) of the
    engine's runner over the cache the earlier steps wrote."""
    engine = llm.engine
    seq = Sequence(-1, "teacher-forced", 0, list(tokens), SamplingParams(max_tokens=1), None)
    engine.block_manager.allocate(seq, cached=False)
    rows = []
    try:
        for c in range(len(tokens)):
            seq.num_computed_tokens = c
            rows.append(engine.runner.run([seq], [1]).logits[0])
    finally:
        engine.block_manager.free(seq)
    return torch.stack(rows)


def mean_kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    p = torch.log_softmax(ref.double(), -1)
    return float((p.exp() * (p - torch.log_softmax(other.double(), -1))).sum(-1).mean())


def stack_and_layer_logits(llm, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_logits through the engine's stack, then through its layers."""
    model = llm.engine.host.model.model
    stack = model.fused_decode
    assert isinstance(stack, FusedDecodeStack)
    fused = decode_logits(llm, tokens).float()
    model.fused_decode = None
    try:
        return fused, decode_logits(llm, tokens).float()
    finally:
        model.fused_decode = stack


@pytest.fixture(scope="module")
def measured(tiny_model, tmp_path_factory):
    return measure_tiny(tiny_model, tmp_path_factory.mktemp("measure") / "inc_output", PROMPTS)


def fp8_tiny(tiny_model, prefix, kv="fp8_inc", **fp8lm_options):
    config = {"mode": "QUANTIZE", "scale_method": "maxabs_hw", "dump_stats_path": str(prefix)}
    if fp8lm_options:
        config["fp8lm"] = fp8lm_options
    return LLM(str(tiny_model), quantization="inc", quant_config=config, kv_cache_dtype=kv, max_model_len=128,
               skip_warmup=True, kv_cache_memory=1 << 20)


def test_fp8_tiny_model_runs_decode_steps_in_one_call(tiny_model, measured, monkeypatch):
    llm = fp8_tiny(tiny_model, measured)
    stack = llm.engine.host.model.model.fused_decode
    assert isinstance(stack, FusedDecodeStack)
    calls = []
    original = FusedDecodeStack.__call__
    monkeypatch.setattr(FusedDecodeStack, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(calls) == 5                                  # 5 decode steps after one prefill of both prompts


@pytest.mark.parametrize("kv", ["fp8_inc", "auto"], ids=["fp8-cache", "float32-cache"])
@pytest.mark.parametrize("options", [{}, {"exact_first_token": True}], ids=["plain", "exact_first_token"])
def test_stack_equals_the_layer_by_layer_path(tiny_model, measured, options, kv):
    """Same kernels, same casts: what may differ is float32 rounding in RMSNorm and SiLU (a sum in
    double vs torch's vectorized one, libm's exp vs Sleef's), ~1e-7 relative, and two layers of 64
    features leave an FP8 rounding flip little room. Measured here: bit for bit equal. decode_logits
    computes token 0 in a one-token step too, so with exact_first_token the stack must keep its K/V.
    Over FP8 caches and over the model's float32 K/V (FP8 weights without an FP8 cache)."""
    llm = fp8_tiny(tiny_model, measured, kv, **options)
    assert all(a.exact_first_token == bool(options) for a in llm.engine.host.model.attention_layers())
    assert llm.engine.host.model.attention_layers()[0].k_cache_tensor.dtype == (
        torch.float8_e4m3fn if kv == "fp8_inc" else torch.float32)
    fused, layered = stack_and_layer_logits(llm, [t for p in PROMPTS for t in p][:90])
    assert (fused.argmax(-1) == layered.argmax(-1)).float().mean() > 0.97
    assert mean_kl(layered, fused) < 1e-4, mean_kl(layered, fused)
    assert torch.allclose(fused, layered, atol=1e-2)


def test_stack_applies_k_smoothing_offsets(tiny_model, measured):
    """With per-channel key offsets (fp8lm's k_smoothing) the stack subtracts them too."""
    llm = fp8_tiny(tiny_model, measured)
    attn = llm.engine.host.model.attention_layers()
    assert all(a.key_offset is None for a in attn)
    tokens = [t for p in PROMPTS for t in p][:60]
    for a in attn:
        offset = torch.linspace(-0.5, 0.5, a.num_kv_heads * a.head_dim).view(a.num_kv_heads, a.head_dim)
        a.adjustment = dataclasses.replace(a.adjustment, key_offset=offset)
    fuse_decode_steps(llm.engine.host.model, attn[0].fused_attention.kernels)
    fused, layered = stack_and_layer_logits(llm, tokens)
    assert mean_kl(layered, fused) < 1e-4, mean_kl(layered, fused)


@pytest.mark.slow
def test_smollm2_stack_is_within_the_fp8_noise_floor(smollm2, smollm2_fp8):
    """On SmolLM2 (30 layers) float32 rounding differences cascade through FP8 roundings up to the
    noise floor of static FP8 (tests/fp8_noise.py); the stack must not add to it."""
    kw = dict(quantization="inc", quant_config=str(smollm2_fp8), kv_cache_dtype="fp8_inc", max_model_len=512,
              max_num_seqs=1, num_kv_blocks=32, skip_warmup=True)
    llm, perturbed = LLM(str(smollm2), **kw), LLM(str(smollm2), **kw)
    assert isinstance(llm.engine.host.model.model.fused_decode, FusedDecodeStack)
    tokens = llm.get_tokenizer().encode(read_text(None))[:400]
    fused = decode_logits(llm, tokens)
    llm.engine.host.model.model.fused_decode = None
    perturbed.engine.host.model.model.fused_decode = None
    layered = decode_logits(llm, tokens)
    perturb_embeddings(perturbed, 1e-6)
    floor = mean_kl(layered, decode_logits(perturbed, tokens))
    paths = mean_kl(layered, fused)
    print(f"stack vs layer-by-layer KL {paths:.4f}, floor {floor:.4f}")
    assert floor > 0.005
    assert paths < 1.25 * floor, (paths, floor)


def plain_tiny(tiny_model, dtype):
    return LLM(str(tiny_model), dtype=dtype, max_model_len=128, skip_warmup=True, kv_cache_memory=1 << 20)


def test_float32_models_decode_in_one_call_as_their_layers_do(tiny_model):
    """An unquantized float32 model: oneDNN's packed Linears (the ops its layers call) and the plain
    attention kernel, glued in C++. What may differ is float32 rounding order (RMSNorm's sum, exp):
    measured max |Δ| 2.3e-6 on logits of size ~1."""
    fused, layered = stack_and_layer_logits(plain_tiny(tiny_model, "float32"), [t for p in PROMPTS for t in p][:90])
    diff = (fused - layered).abs().max().item()
    assert 0 < diff <= 1e-5, diff


@pytest.fixture(scope="module")
def bfloat16_valued(tiny_model, tmp_path_factory):
    """The tiny model with every tensor rounded to bfloat16 values, stored as float32."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("bf16-valued") / "llama"
    shutil.copytree(tiny_model, folder)
    for f in folder.glob("*.safetensors"):
        save_file({k: v.bfloat16().float() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("linears", ["panels", "this-cpu"])
def test_bfloat16_models_decode_in_one_call_rounding_fewer_activations(tiny_model, bfloat16_valued, linears,
                                                                         monkeypatch):
    """A bfloat16 model's stack keeps activations float32 between its matmuls. On the kernels' bfloat16
    panels (float32 sums of float32 inputs; forced on any CPU here) it differs from the float32 model
    of the same (bfloat16) values only by the K/V cache's and the rotary table's bfloat16 rounding, ~4
    roundings per layer, where its layers round ~15 activations per layer (norms, projections, rotary,
    residuals, SiLU·up): measured KL 6.6e-6 against 4.9e-5; with the norms' and projections' outputs
    rounded in the stack too, 1.9e-5. Where oneDNN packs bfloat16 ("this-cpu" on AVX-512 / AMX; the
    panels again on AVX2) the matmuls' inputs are rounded as the modules round them: a subset of the
    layers' roundings still, so closer than the layers (not measured on such a CPU yet)."""
    import fp8lm.engine.model_host as model_host
    from fp8lm.model.linear import bfloat16_matmul_is_slow
    from fp8lm.quant.bfloat16_format import BF16Panels

    monkeypatch.setattr(model_host, "bfloat16_matmul_is_slow", lambda: linears == "panels" or bfloat16_matmul_is_slow())
    tokens = [t for p in PROMPTS for t in p][:90]
    llm = plain_tiny(tiny_model, "bfloat16")
    fused, layered = stack_and_layer_logits(llm, tokens)
    reference = plain_tiny(bfloat16_valued, "float32")
    reference.engine.host.model.model.fused_decode = None          # independent of the stack
    same_values = decode_logits(reference, tokens).float()
    stack_kl, layers_kl = mean_kl(same_values, fused), mean_kl(same_values, layered)
    panels = isinstance(llm.engine.host.model.model.layers[0].self_attn.q_proj.format, BF16Panels)
    assert stack_kl < (layers_kl / 3 if panels else layers_kl), (stack_kl, layers_kl)


def test_a_quantized_model_with_high_precision_parts_decodes_in_one_call(tiny_model, measured):
    """FP8 layers over FP8 caches beside a layer whose attention (and its float32 cache) and a Linear are
    kept in high precision: one call, each part as the layers compute it."""
    config = {"mode": "QUANTIZE", "scale_method": "maxabs_hw", "dump_stats_path": str(measured),
              "blocklist": {"names": [r"model\.layers\.1\.self_attn\.attn\.", r"model\.layers\.0\.mlp\.down_proj"]}}
    llm = LLM(str(tiny_model), quantization="inc", quant_config=config, kv_cache_dtype="fp8_inc", max_model_len=128,
              skip_warmup=True, kv_cache_memory=1 << 20)
    layers = llm.engine.host.model.model.layers
    assert [a.k_cache_tensor.dtype for a in llm.engine.host.model.attention_layers()] == [torch.float8_e4m3fn, torch.float32]
    assert type(layers[0].mlp.down_proj.format).__name__ == "OneDNNPacked"
    fused, layered = stack_and_layer_logits(llm, [t for p in PROMPTS for t in p][:90])
    assert (fused.argmax(-1) == layered.argmax(-1)).float().mean() > 0.97
    assert mean_kl(layered, fused) < 1e-4, mean_kl(layered, fused)


def test_the_engine_says_why_decode_steps_are_not_fused(tiny_model, measured, caplog):
    """A model the stack cannot run decodes layer by layer, and the log says why."""
    import logging

    config = {"mode": "QUANTIZE", "scale_method": "maxabs_hw", "dump_stats_path": str(measured),
              "allow_measurement_mismatch": True}
    with caplog.at_level(logging.INFO, logger="fp8lm.quant.fused_decode"):
        llm = LLM(str(tiny_model), quantization="inc", quant_config=config, dtype="bfloat16", max_model_len=128,
                  skip_warmup=True)
    assert llm.engine.host.model.model.fused_decode is None
    assert "layer by layer" in caplog.text and "FP8 layers of a bfloat16 model" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fp8lm.quant.fused_decode"):
        fused = fp8_tiny(tiny_model, measured)
    assert fused.engine.host.model.model.fused_decode is not None and "layer by layer" not in caplog.text


def test_a_part_swapped_after_the_build_sends_decode_steps_back_to_the_layers(tiny_model, monkeypatch):
    """The stack holds copies of the layers' weights and kernels: once an attention kernel or a Linear's
    format is replaced (a report keeping a unit in high precision, a test comparing paths), the layers run."""
    import copy

    llm = plain_tiny(tiny_model, "float32")
    calls = []
    original = FusedDecodeStack.__call__
    monkeypatch.setattr(FusedDecodeStack, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    layers = llm.engine.host.model.model.layers
    attn, down = layers[1].self_attn.attn, layers[0].mlp.down_proj
    kernel, fmt = attn.fused_attention, down.format
    for swap, restore in [(lambda: setattr(attn, "fused_attention", None), lambda: setattr(attn, "fused_attention", kernel)),
                          (lambda: setattr(down, "format", copy.copy(fmt)), lambda: setattr(down, "format", fmt))]:
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
        assert len(calls) == 2                             # two decode steps after the prompt
        swap()
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
        assert len(calls) == 2
        restore()
        calls.clear()
