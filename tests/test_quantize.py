"""QUANTIZE mode on a tiny Llama: FP8 modules, their arithmetic, the KV cache, the guards."""
import json

import pytest
import torch

from conftest import measure_tiny
from fp8lm import LLM, SamplingParams
from fp8lm.errors import FP8LMError
from fp8lm.model.linear import LMHead
from fp8lm.fp8 import cpu_kernels as ck
from fp8lm.quant import fp8_modules, fused_ops
from fp8lm.quant.fp8_linear import FP8Panels, is_fp8
from fp8lm.quant.fp8_modules import FP8KVCache, FP8Matmul, FP8Softmax

PROMPTS = [[int(t) for t in torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (6, 19, 31, 11, 25)]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def measured(tiny_model, tmp_path_factory):
    return measure_tiny(tiny_model, tmp_path_factory.mktemp("measure") / "inc_output", PROMPTS)


def quantized(tiny_model, prefix, kv="fp8_inc", **cfg):
    config = {"mode": "QUANTIZE", "scale_method": "maxabs_hw", "dump_stats_path": str(prefix), **cfg}
    return LLM(str(tiny_model), quantization="inc", quant_config=config, kv_cache_dtype=kv, max_model_len=64,
               skip_warmup=True, kv_cache_memory=1 << 18)


def test_modules_are_swapped_and_outputs_stay_close(tiny_model, measured):
    llm = quantized(tiny_model, measured)
    model = llm.engine.host.model
    attn = model.model.layers[0].self_attn
    assert is_fp8(attn.q_proj) and attn.q_proj.format.fp8_weight(attn.q_proj).dtype == torch.float8_e4m3fn
    assert isinstance(attn.attn.matmul_qk, FP8Matmul) and isinstance(attn.attn.softmax, FP8Softmax)
    assert isinstance(attn.attn.k_cache, FP8KVCache)
    assert attn.attn.k_cache_tensor.dtype == torch.float8_e4m3fn
    ref = LLM(str(tiny_model), max_model_len=64, skip_warmup=True)
    a = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
    b = ref.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
    agree = sum(x.outputs[0].token_ids == y.outputs[0].token_ids for x, y in zip(a, b))
    assert agree >= 4


def test_fp8_kv_cache_holds_four_times_the_blocks(tiny_model, measured):
    fp8 = quantized(tiny_model, measured)
    hp = LLM(str(tiny_model), max_model_len=64, skip_warmup=True, kv_cache_memory=1 << 18)
    assert fp8.engine.num_kv_blocks == 4 * hp.engine.num_kv_blocks


def test_linear_arithmetic_equals_torch_float8_reference(tiny_model, measured):
    llm = quantized(tiny_model, measured, kv="auto")
    q = llm.engine.host.model.model.layers[1].mlp.down_proj
    x = torch.randn(7, q.in_features) * 3
    s_in, s_w = q.input_scale, torch.as_tensor(q.weight_scale)
    # Independent: torch's own float8 casts, dequantize, float64 matmul.
    xq = (x * (1 / s_in)).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s_in
    wq = q.format.fp8_weight(q).double() * s_w.double()
    expected = xq @ wq.T
    assert torch.allclose(q(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_scale_formats_give_identical_outputs(tiny_model, measured):
    outs = {}
    for fmt in ("SCALAR", "CONST"):
        llm = quantized(tiny_model, measured, scale_format=fmt)
        outs[fmt] = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True),
                                 use_tqdm=False)
        q = llm.engine.host.model.model.layers[0].self_attn.q_proj
        assert isinstance(q.input_scale, torch.Tensor) == (fmt == "CONST")
    for a, b in zip(outs["SCALAR"], outs["CONST"]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert {k: v.logprob for k, v in la.items()} == {k: v.logprob for k, v in lb.items()}


def test_fp8_batching_is_exact(tiny_model, measured):
    llm = quantized(tiny_model, measured)
    together = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    alone = [llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    assert together == alone


def test_blocklist_keeps_lm_head_in_high_precision(tiny_model, measured):
    llm = quantized(tiny_model, measured, blocklist={"names": ["lm_head"], "types": ["Softmax"]})
    assert type(llm.engine.host.model.lm_head) is LMHead
    assert not isinstance(llm.engine.host.model.model.layers[0].self_attn.attn.softmax, FP8Softmax)


def pow2_up(x):
    return 2.0 ** torch.ceil(torch.log2(torch.as_tensor(x, dtype=torch.float64)))


def least_error_scale(w, candidates):
    """By brute force with torch's own float8 cast: the candidate with the least ||W - Q(W)||²."""
    errors = [float(((w / c).to(torch.float8_e4m3fn).float() * c - w).pow(2).sum()) for c in candidates]
    return candidates[errors.index(min(errors))]


# (weight scale of q_proj from its weight W and measured max m_w, input scale from measured max m_in),
# by hand for each method on the cpu profile (E4M3 448, any scale: hw-aligned = pow2)
EXPECTED = {
    "maxabs_hw": (lambda w: pow2_up(w.abs().max() / 224), lambda m: pow2_up(m / 112)),
    "maxabs_pow2": (lambda w: pow2_up(w.abs().max() / 224), lambda m: pow2_up(m / 112)),
    "maxabs_arbitrary": (lambda w: w.abs().max() / 224, lambda m: m / 112),
    "maxabs_hw_opt_weight": (lambda w: least_error_scale(w, [2.0 ** e for e in range(-10, 10)]),
                             lambda m: pow2_up(m / 112)),
    "maxabs_pow2_opt_weight": (lambda w: least_error_scale(w, [2.0 ** e for e in range(-10, 10)]),
                               lambda m: pow2_up(m / 112)),
    "act_maxabs_hw_weights_pcs_maxabs_pow2": (lambda w: pow2_up(w.abs().amax(1, keepdim=True) / 224),
                                              lambda m: pow2_up(m / 112)),
    "act_maxabs_pow2_weights_pcs_opt_pow2": (
        lambda w: torch.stack([torch.tensor(least_error_scale(r[None], [float(pow2_up(r.abs().max() / 224)) * 2.0 ** e
                                                                         for e in range(-3, 5)])) for r in w])[:, None],
        lambda m: pow2_up(m / 112)),
    "maxabs_pcs_pow2": (lambda w: pow2_up(w.abs().amax(1, keepdim=True) / 224), lambda m: None),
    "hw_aligned_single_scale": (lambda w: 1.0, lambda m: 1.0),
}


@pytest.mark.parametrize("method", list(EXPECTED))
def test_every_method_gives_its_scales(tiny_model, measured, method):
    from safetensors.torch import load_file

    llm = quantized(tiny_model, measured, scale_method=method, kv="auto")
    q = llm.engine.host.model.model.layers[0].self_attn.q_proj
    w = load_file(tiny_model / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].float()
    m_in = json.loads(open(f"{measured}_hooks_maxabs.json").read())["Nodes"]["model.layers.0.self_attn.q_proj"]["inputs"][0][0][0]
    w_scale, in_scale = EXPECTED[method]
    got = torch.as_tensor(q.weight_scale, dtype=torch.float64)
    assert torch.allclose(got.reshape(-1), torch.as_tensor(w_scale(w), dtype=torch.float64).reshape(-1), rtol=1e-6)
    expected_in = in_scale(m_in)
    assert (q.input_scale is None) if expected_in is None else q.input_scale == pytest.approx(float(expected_in), rel=1e-6)
    out = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)
    assert (measured.parent / f"{measured.name}_hooks_maxabs_{method.upper()}_CPU.json").is_file()


def test_unit_scale_needs_no_measurement(tiny_model, tmp_path):
    llm = quantized(tiny_model, tmp_path / "none", scale_method="unit_scale")
    assert is_fp8(llm.engine.host.model.lm_head) and llm.engine.host.model.lm_head.input_scale == 1.0


def edit_measurement(prefix, tmp_path, edit):
    data = json.loads((prefix.parent / f"{prefix.name}_hooks_maxabs.json").read_text())
    edit(data)
    out = tmp_path / "edited"
    (tmp_path / "edited_hooks_maxabs.json").write_text(json.dumps(data))
    return out


def test_unmeasured_module_is_named(tiny_model, measured, tmp_path):
    prefix = edit_measurement(measured, tmp_path, lambda d: d["Nodes"].pop("model.layers.1.mlp.up_proj"))
    with pytest.raises(FP8LMError, match=r"model\.layers\.1\.mlp\.up_proj: allowlisted but not measured"):
        quantized(tiny_model, prefix)
    llm = quantized(tiny_model, prefix, ignore_modules_wo_measures=True)
    assert not is_fp8(llm.engine.host.model.model.layers[1].mlp.up_proj)


@pytest.mark.parametrize("field,value,needle", [
    ("compute_dtype", "bfloat16", "compute_dtype bfloat16 (measured) vs float32 (now)"),
    ("device", "cuda:sm90", "device cuda (measured) vs cpu (now)"),
])
def test_measurements_from_elsewhere_are_refused(tiny_model, measured, tmp_path, field, value, needle):
    prefix = edit_measurement(measured, tmp_path, lambda d: d["Fp8lmMetadata"].__setitem__(field, value))
    with pytest.raises(FP8LMError) as e:
        quantized(tiny_model, prefix)
    assert needle in str(e.value) and "allow_measurement_mismatch" in str(e.value)
    quantized(tiny_model, prefix, allow_measurement_mismatch=True)


def test_measurements_of_another_model_are_refused(tiny_model, measured, tmp_path):
    prefix = edit_measurement(measured, tmp_path,
                              lambda d: d["Fp8lmMetadata"]["model"].__setitem__("weights_checksum", "0" * 32))
    with pytest.raises(FP8LMError, match="different weights or config"):
        quantized(tiny_model, prefix)


def test_missing_measurement_file(tiny_model, tmp_path):
    with pytest.raises(FP8LMError, match="no measurement file.*fp8lm calibrate"):
        quantized(tiny_model, tmp_path / "nothing")


def test_auto_mode_measures_then_quantizes(tiny_model, tmp_path):
    cfg = {"mode": "AUTO", "dump_stats_path": str(tmp_path / "auto")}
    first = LLM(str(tiny_model), quantization="inc", quant_config=cfg, max_model_len=64)
    assert first.engine.host.measurement is not None
    first.generate(PROMPTS, GREEDY, use_tqdm=False)
    first.finalize_calibration()
    second = LLM(str(tiny_model), quantization="inc", quant_config=cfg, max_model_len=64)
    assert is_fp8(second.engine.host.model.lm_head)


def test_skipping_requantization_of_cache_reads_is_exact(tiny_model, measured, monkeypatch):
    """K/V read from the FP8 cache are not rounded again when q·kᵀ / p·v use the cache's own
    power-of-two scale (fp8lm's attention_scales_from_cache), in FP8Matmul and in the fused
    attention kernel alike: the same logprobs as rounding them again."""
    llm = quantized(tiny_model, measured, fp8lm={"attention_scales_from_cache": True})
    layers = llm.engine.host.model.attention_layers()
    assert all(a.matmul_qk.scale_b == a.k_cache.scale and a.matmul_av.scale_b == a.v_cache.scale for a in layers)
    fused = [a.fused_attention for a in layers]
    assert all(f is not None and f.requantize == (False, False) for f in fused)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)

    def logprobs(outputs):
        return [(o.outputs[0].token_ids, [{k: v.logprob for k, v in e.items()} for e in o.outputs[0].logprobs])
                for o in outputs]

    fused_skip = logprobs(llm.generate(PROMPTS, params, use_tqdm=False))
    for f in fused:
        f.requantize = (True, True)
    assert logprobs(llm.generate(PROMPTS, params, use_tqdm=False)) == fused_skip

    for attn in layers:                   # the modules' path: FP8Matmul skips the second rounding
        attn.fused_attention = None
    rounded = []
    original = fp8_modules.fp8_grid
    monkeypatch.setattr(fp8_modules, "fp8_grid", lambda x, *a: rounded.append(x.shape) or original(x, *a))
    modules_skip = logprobs(llm.generate(PROMPTS, params, use_tqdm=False))
    calls_skip = len(rounded)
    slow_forward = FP8Matmul.forward
    monkeypatch.setattr(FP8Matmul, "forward", lambda self, a, b, b_grid_scale=None: slow_forward(self, a, b))
    modules_again = logprobs(llm.generate(PROMPTS, params, use_tqdm=False))
    assert len(rounded) - calls_skip > calls_skip      # the slow path rounded K and V again
    assert modules_again == modules_skip


def assert_same_generations(a, b) -> None:
    """Same greedy tokens and the same top logprobs (to 1e-4) at every step."""
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            for t, lp in ly.items():
                assert abs(lx[t].logprob - lp.logprob) < 1e-4


def chunked_prompt_logits(llm, prompts, chunk: int) -> list[torch.Tensor]:
    """Every position's logits of `prompts`, prefilled together in chunks of `chunk` tokens: later
    chunks attend to keys earlier steps cached, queries padded to the longest chunk of a step."""
    from fp8lm.engine.sequence import Sequence

    engine = llm.engine
    seqs = [Sequence(-1 - i, f"chunked-{i}", 0, list(p), SamplingParams(max_tokens=1), None) for i, p in enumerate(prompts)]
    rows = {s.seq_id: [] for s in seqs}
    for s in seqs:
        engine.block_manager.allocate(s, cached=False)
    try:
        while active := [s for s in seqs if s.num_computed_tokens < s.num_prompt_tokens]:
            lens = [min(chunk, s.num_prompt_tokens - s.num_computed_tokens) for s in active]
            out = engine.runner.run(active, lens, {s.seq_id for s in active})
            for s, q in zip(active, lens):
                rows[s.seq_id] += [logits for _, logits in engine.runner.prompt_logit_blocks(out.prompt_hidden[s.seq_id])]
                s.num_computed_tokens += q
    finally:
        for s in seqs:
            engine.block_manager.free(s)
    return [torch.cat(rows[s.seq_id]) for s in seqs]


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("chunk", [7, 45])
@pytest.mark.parametrize("kv", ["fp8_inc", "auto"])
def test_fused_prefill_attention_matches_the_fp8_modules(tiny_model, measured, chunk, isa, kv, monkeypatch):
    """Prompt chunks (queries padded per step, later chunks reading earlier ones' cached keys; 45
    crosses the kernel's 32-query tiles) through the fused kernel vs FP8Matmul/FP8Softmax over the same
    cache: FP8 (fp8_inc), or float32 (auto: FP8 attention over the model's K/V, cast as they are
    read). The FP8 casts are the same; the softmax's exp (a polynomial vs torch's) and sums may differ
    in float32's last bit, which flips a probability's FP8 rounding only rarely: rows must match to
    1e-5, all but a few bit for bit. Measured here: every row bit for bit."""
    from fp8lm.fp8.cpu_kernels import ISA_CODES, CpuKernels

    llm = quantized(tiny_model, measured, kv=kv)
    assert llm.engine.host.model.attention_layers()[0].k_cache_tensor.dtype == (
        torch.float8_e4m3fn if kv == "fp8_inc" else torch.float32)
    layers = llm.engine.host.model.attention_layers()
    best = layers[0].fused_attention.kernels
    if ISA_CODES[isa] > ISA_CODES[best.isa]:
        pytest.skip(f"this CPU has no {isa}")
    kernels = [fused_ops.FusedFP8Attention(a, CpuKernels(best.module, isa)) for a in layers]
    calls = []
    original = fused_ops.FusedFP8Attention.__call__
    monkeypatch.setattr(fused_ops.FusedFP8Attention, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    prompts = [[int(t) for t in torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (50, 37, 9, 33)]
    for attn, f in zip(layers, kernels):
        attn.fused_attention = f
    fused = torch.cat(chunked_prompt_logits(llm, prompts, chunk))
    ran = len(calls)
    assert ran >= len(layers) * (50 // chunk)           # the steps' prompt chunks ran fused
    for attn in layers:
        attn.fused_attention = None
    modules = torch.cat(chunked_prompt_logits(llm, prompts, chunk))
    assert len(calls) == ran
    diff = (fused - modules).abs().amax(-1)
    assert (diff <= 1e-5).float().mean() >= 0.97 and (diff == 0).float().mean() >= 0.9, diff


def test_cpu_kernels_keep_one_byte_per_weight_and_match_the_reference_path(tiny_model, measured, monkeypatch):
    fast = quantized(tiny_model, measured)
    linears = [m for m in fast.engine.host.model.modules() if is_fp8(m)]
    assert linears and all(isinstance(m.format, FP8Panels) and m.format.backend.startswith("cpu-") for m in linears)
    for m in linears:   # only the packed FP8 bytes are resident: no dequantized copy
        assert m.format.packed.dtype == torch.uint8 and m.weight.is_meta
        assert m.format.packed.numel() == -(-m.out_features // 32) * 32 * m.in_features
    monkeypatch.setattr(ck, "cpu_kernels", lambda: None)
    reference = quantized(tiny_model, measured)
    assert all(m.format.backend.startswith("emulated") for m in reference.engine.host.model.modules() if is_fp8(m))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    a = fast.generate(PROMPTS, params, use_tqdm=False)
    b = reference.generate(PROMPTS, params, use_tqdm=False)
    assert_same_generations(a, b)


def test_fp8_attention_over_the_models_own_cache_runs_fused_as_its_modules(tiny_model, measured, monkeypatch):
    """FP8 weights and attention over a float32 K/V cache (no kv_cache_dtype): the kernel casts K and V
    onto the matmuls' grids as it reads them, as FP8Matmul casts them. Decode steps: the same tokens,
    logprobs within 1e-4 of the modules'. The whole-decoder decode step (tests/test_fused_decode.py) is
    set aside, so that decode steps run layer by layer through this kernel."""
    llm = quantized(tiny_model, measured, kv="auto")
    layers = llm.engine.host.model.attention_layers()
    assert all(isinstance(a.fused_attention, fused_ops.FusedFP8Attention) and a.k_cache_tensor.dtype == torch.float32
               for a in layers)
    assert llm.engine.host.model.model.fused_decode is not None
    llm.engine.host.model.model.fused_decode = None
    calls = []
    original = fused_ops.FusedFP8Attention.attend
    monkeypatch.setattr(fused_ops.FusedFP8Attention, "attend", lambda self, *a: calls.append(1) or original(self, *a))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    fused = llm.generate(PROMPTS, params, use_tqdm=False)
    assert len(calls) >= len(layers) * 8                    # the prompts' step and every decode step
    for attn in layers:
        attn.fused_attention = None
    assert_same_generations(fused, llm.generate(PROMPTS, params, use_tqdm=False))


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("scales", ["own grid", "other scale", "same scale"])
def test_fused_decode_attention_matches_the_fp8_modules(tiny_model, measured, scales, isa):
    """K and V read on the matmuls' own power-of-two grid (no cast), at another scale (cast onto the
    grid again), and at the caches' own scale that is no power of two: the modules cast (the products
    with the scale and its inverse are off by ulps), the kernel reads the cached values, which is what
    that cast returns."""
    from fp8lm.fp8.cpu_kernels import ISA_CODES, CpuKernels

    llm = quantized(tiny_model, measured)
    layers = llm.engine.host.model.attention_layers()
    best = layers[0].fused_attention.kernels
    if ISA_CODES[isa] > ISA_CODES[best.isa]:
        pytest.skip(f"this CPU has no {isa}")
    kernels = CpuKernels(best.module, isa)
    for attn in layers:
        if scales == "other scale":
            attn.matmul_qk.scale_b, attn.matmul_av.scale_b = 2 * attn.k_cache.scale, 3 * attn.v_cache.scale
        elif scales == "same scale":
            attn.k_cache.scale = attn.matmul_qk.scale_b = 1.37 * attn.k_cache.scale
            attn.v_cache.scale = attn.matmul_av.scale_b = 0.83 * attn.v_cache.scale
    fused = [fused_ops.FusedFP8Attention(attn, kernels) for attn in layers]
    assert all(f.requantize == ((scales != "own grid"),) * 2 for f in fused)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    for attn, f in zip(layers, fused):
        attn.fused_attention = f
    a = llm.generate(PROMPTS, params, use_tqdm=False)
    for attn in layers:
        attn.fused_attention = None
    b = llm.generate(PROMPTS, params, use_tqdm=False)
    assert_same_generations(a, b)
