"""fp8lm's accuracy-first recipe, technique by technique, against hand-computed references."""
import dataclasses
import json

import pytest
import torch

from fp8lm import LLM
from fp8lm.errors import FP8LMError
from fp8lm.fp8.gptq import gptq_round, output_error, round_to_nearest
from fp8lm.fp8.numerics import fake_quant, round_to_fp8_grid
from fp8lm.model.attention import CacheAdjustment
from fp8lm.quant.config import parse_quant_config

E4M3 = torch.float8_e4m3fn


def correlated_inputs(n=512, dim=64, rank=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=g)
    return torch.randn(n, rank, generator=g) @ basis + 0.05 * torch.randn(n, dim, generator=g)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    x = correlated_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    h = (x.T @ x).double()
    scale = w.abs().amax() / 448
    q = gptq_round(w, h, scale, E4M3, 448.0)
    assert torch.equal(round_to_fp8_grid(q, E4M3, 448.0), q)                    # plain FP8 values
    nearest = round_to_nearest(w, scale, E4M3, 448.0)
    gptq_err, rtn_err = output_error(w, q * scale, h), output_error(w, nearest * scale, h)
    # ||X (W - Ŵ)ᵀ||² measured directly on the inputs, not through H
    assert gptq_err == pytest.approx(float(((x @ (w - q * scale).T) ** 2).sum()), rel=1e-4)
    assert gptq_err < 0.5 * rtn_err


def test_gptq_is_round_to_nearest_when_inputs_are_uncorrelated():
    """H = c·I: no column's error can be compensated by another, so GPTQ rounds to nearest."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    scale = torch.full((16, 1), 0.01)
    q = gptq_round(w, 3.0 * torch.eye(32, dtype=torch.float64), scale, E4M3, 448.0)
    assert torch.equal(q, round_to_nearest(w, scale, E4M3, 448.0))


def test_gptq_batches_and_stacked_rows_round_each_problem_as_alone():
    """A batch of problems (each its own H) rounds each as alone; rows of Linears sharing one H
    (q/k/v, gate/up) stacked with each row's own scale round as each Linear alone (gptq_rounds)."""
    from fp8lm.quant.recipe import gptq_rounds

    hs = [(correlated_inputs(seed=s).T @ correlated_inputs(seed=s)).double() for s in range(3)]
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(24, 64, generator=g) * (1 + i) for i in range(3)]
    scales = [w.abs().amax().reshape(1) / 448 for w in ws]
    alone = [gptq_round(w, h, s, E4M3, 448.0) for w, h, s in zip(ws, hs, scales)]
    batch = gptq_round(torch.stack(ws), torch.stack(hs), torch.stack(scales).reshape(3, 1, 1), E4M3, 448.0)
    assert all(torch.equal(a, b) for a, b in zip(alone, batch))
    # q, k, v read one input (one H); "o" has an H of its own and the same shape as the stacked q/k/v
    shared = [gptq_round(w, hs[0], s, E4M3, 448.0) for w, s in zip(ws, scales)]
    o = torch.randn(72, 64, generator=g)
    got = gptq_rounds({"q": (ws[0], hs[0], scales[0]), "k": (ws[1], hs[0], scales[1]),
                       "v": (ws[2], hs[0], scales[2]), "o": (o, hs[1], o.abs().amax().reshape(1) / 448)},
                      E4M3, 448.0)
    assert all(torch.equal(got[n], q) for n, q in zip("qkv", shared))
    assert torch.equal(got["o"], gptq_round(o, hs[1], o.abs().amax().reshape(1) / 448, E4M3, 448.0))


@pytest.mark.parametrize("t, k", [(1, 1), (37, 3), (300, 201), (64, 600)])
def test_float32_gram_is_the_inputs_second_moment(t, k):
    """XᵀX from the blocks on and above the diagonal, mirrored: the float64 product to float32
    summation order, symmetric bit for bit (k not a multiple of the block count included)."""
    from fp8lm.quant.statistics import float32_gram

    x = torch.randn(t, k, generator=torch.Generator().manual_seed(t)) * 3
    got = float32_gram(x)
    expected = x.double().T @ x.double()
    bound = (t + 2) * 2.0**-24 * (x.abs().double().T @ x.abs().double())
    assert got.shape == (k, k) and ((got.double() - expected).abs() <= bound).all()
    assert torch.equal(got, got.T)


def test_linears_reading_one_input_share_one_second_moment(recipe_calibration, tiny_model):
    """q/k/v (and gate/up) of the plain-scale FP8 model: one XqᵀXq tensor each group, added to once per
    input, equal to the one computed by hand from what q_proj receives."""
    from fp8lm.quant.recipe import PLAIN_OPTIONS
    from fp8lm.quant.statistics import StatisticsCollector

    config = {**json.loads(recipe_calibration.quant_config.read_text()), "fp8lm": PLAIN_OPTIONS}
    llm = LLM(str(tiny_model), quantization="inc", quant_config=config, max_model_len=64, skip_warmup=True)
    collector = StatisticsCollector(llm.engine.host.model, search_scales=False)
    attn = llm.engine.host.model.model.layers[0].self_attn
    seen = []
    attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    llm.engine.score(list(range(3, 40)))
    collector.detach()
    stats = {n.rpartition(".")[2]: s for n, s in collector.linears.items() if n.startswith("model.layers.0.")}
    assert stats["q_proj"].hessian is stats["k_proj"].hessian is stats["v_proj"].hessian
    assert stats["gate_proj"].hessian is stats["up_proj"].hessian
    assert stats["o_proj"].hessian is not stats["q_proj"].hessian
    q = attn.q_proj
    xq = (fake_quant(seen[0], 1 / q.input_scale, q.format.fmt.dtype, q.format.fmt.limit) * q.input_scale).double()
    bound = (xq.shape[0] + 5) * 2.0**-24 * (xq.abs().T @ xq.abs())        # float32 sums in any order
    assert ((stats["q_proj"].hessian - xq.T @ xq).abs() <= bound).all()


def test_measure_pass_statistics_are_the_high_precision_inputs_second_moments(recipe_calibration, tiny_model):
    """In MEASURE's own pass (calibrate's one pass): H of every Linear QUANTIZE will make FP8 (not the
    blocklisted LM head) is XᵀX of the high-precision inputs it receives, q/k/v and gate/up sharing
    one tensor."""
    from fp8lm.model.linear import ParallelLinear
    from fp8lm.quant.config import load_quant_config
    from fp8lm.quant.quantize import planned_linears
    from fp8lm.quant.statistics import StatisticsCollector

    measure_cfg = {"method": "HOOKS", "mode": "MEASURE", "observer": "maxabs",
                   "dump_stats_path": str(recipe_calibration.quant_config.parent / "again")}
    llm = LLM(str(tiny_model), quantization="inc", quant_config=measure_cfg, max_model_len=64, skip_warmup=True)
    model = llm.engine.host.model
    planned = planned_linears(model, load_quant_config(json.loads(recipe_calibration.quant_config.read_text())),
                              llm.engine.host.device)
    linears = [n for n, m in model.named_modules() if isinstance(m, ParallelLinear) and n != "lm_head"]
    assert sorted(planned) == sorted(linears) and len(linears) == 7 * len(model.model.layers)
    collector = StatisticsCollector(model, search_scales=False, planned=planned)
    attn = model.model.layers[0].self_attn
    seen = {}
    for name in ("q_proj", "o_proj"):
        getattr(attn, name).register_forward_pre_hook(
            lambda m, args, n=name: seen.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1])))
    llm.engine.score(list(range(3, 40)))
    llm.engine.score(list(range(5, 30)))
    collector.detach()
    stats = {n.rpartition(".")[2]: s for n, s in collector.linears.items() if n.startswith("model.layers.0.")}
    assert stats["q_proj"].hessian is stats["k_proj"].hessian is stats["v_proj"].hessian
    assert stats["gate_proj"].hessian is stats["up_proj"].hessian
    for name in ("q_proj", "o_proj"):
        x = torch.cat(seen[name]).double()
        bound = (x.shape[0] + 5) * 2.0**-24 * (x.abs().T @ x.abs())       # float32 sums in any order
        assert ((stats[name].hessian - x.T @ x).abs() <= bound).all()


def test_attention_statistics_leave_the_fused_kernel_running(recipe_calibration, tiny_model):
    """The collector observes each attention layer from the layer's own hook: the fused FP8 attention
    kernel keeps running, and the keys' range and the per-KV-head maxima of q·k's queries and of V
    equal what those modules receive on the modules' path (their own hooks, same tokens)."""
    from fp8lm.quant.recipe import PLAIN_OPTIONS
    from fp8lm.quant.statistics import StatisticsCollector

    config = {**json.loads(recipe_calibration.quant_config.read_text()), "fp8lm": PLAIN_OPTIONS}
    llm = LLM(str(tiny_model), quantization="inc", quant_config=config, kv_cache_dtype="fp8_inc",
              max_model_len=64, skip_warmup=True, enable_prefix_caching=False)
    attn = llm.engine.host.model.model.layers[1].self_attn.attn
    kernel, calls = attn.fused_attention, []
    attn.fused_attention = lambda *args: calls.append(1) or kernel(*args)
    attn.fused_attention.applies = kernel.applies
    tokens = list(range(3, 40))
    collector = StatisticsCollector(llm.engine.host.model, search_scales=False)
    llm.engine.score(tokens)
    collector.detach()
    assert calls, "the collector's hooks turned the fused attention kernel off"
    seen = {}
    for which, module in (("key", attn.k_cache), ("query", attn.matmul_qk), ("value", attn.v_cache)):
        module.register_forward_pre_hook(lambda m, args, w=which: seen.setdefault(w, []).append(args[0].float()))
    llm.engine.score(tokens)
    keys = torch.cat(seen["key"])                                       # [T, kv_heads, d]
    prefix = "model.layers.1.self_attn.attn"
    stats = collector.keys[prefix]
    assert torch.equal(stats.low, keys.amin(dim=0)) and torch.equal(stats.high, keys.amax(dim=0))
    queries = torch.cat([q.abs().amax(dim=(1, 2, 3)) for q in seen["query"]]).view(-1, 2).amax(dim=0)
    assert torch.equal(collector.heads[f"{prefix}.query"].maxabs, queries)
    values = torch.cat(seen["value"]).abs().amax(dim=(0, 2))
    assert torch.equal(collector.heads[f"{prefix}.value"].maxabs, values)


def test_key_offset_leaves_attention_unchanged(tiny_model):
    """Subtracting any per-channel constant from the keys shifts every score of a query's row by
    q·offset, which softmax cancels: float32 logits agree to rounding."""
    llm = LLM(str(tiny_model), max_model_len=64, skip_warmup=True)
    tokens = list(range(3, 40))
    before = llm.engine.score(tokens)
    g = torch.Generator().manual_seed(0)
    for attn in llm.engine.host.model.attention_layers():
        attn.adjustment = CacheAdjustment(key_offset=3 * torch.randn(attn.num_kv_heads, attn.head_dim, generator=g))
    after = llm.engine.score(tokens)
    assert (after - before).abs().max() < 1e-5


def test_activation_scale_search_picks_least_output_error():
    from fp8lm.quant.statistics import ACTIVATION_CANDIDATES, LinearStatistics

    class Stub:   # what LinearStatistics reads of an FP8 Linear
        in_features, input_scale = 8, 10.0 / 448

        class format:
            class fmt:
                dtype, limit = E4M3, 448.0

        def dense_weight(self):
            return torch.ones(4, 8)

    stats = LinearStatistics(Stub())
    x = torch.full((64, 8), 1.0)
    x[0, 0] = 10.0                     # one outlier sets the max; the rest sit where clipping is harmless
    stats.update(x)
    expected = [float(((fake_quant(x, 448 / (10 * f), E4M3, 448.0) * 10 * f / 448 - x) ** 2).sum() * 4)
                for f in ACTIVATION_CANDIDATES]
    assert stats.candidate_error.tolist() == pytest.approx(expected, rel=1e-6)
    assert stats.best_activation_factor() == ACTIVATION_CANDIDATES[expected.index(min(expected))]


@pytest.fixture(scope="module")
def recipe_calibration(tiny_model, tmp_path_factory):
    from fp8lm.entrypoints.calibrate import calibrate

    return calibrate(str(tiny_model), "builtin", tmp_path_factory.mktemp("recipe"), num_samples=8, max_seq_len=48,
                     max_tokens=2, use_tqdm=False)


def test_calibrate_writes_the_accuracy_first_recipe(recipe_calibration, tiny_model):
    from safetensors.torch import load_file

    config = json.loads(recipe_calibration.quant_config.read_text())
    assert config["blocklist"]["names"] == ["^lm_head$"]
    assert config["scale_method"]["default"]["activation"] == {"rounding_method": "IDENTITY", "backoff": 1.0}
    parse_quant_config(config, "written", tiny_model)         # a valid INC-style QUANT_CONFIG for fp8lm
    stats = load_file(f"{config['dump_stats_path']}_fp8lm_stats.safetensors")
    w = stats["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == E4M3 and w.shape == (64, 64)
    assert stats["model.layers.1.self_attn.attn.key_offset"].shape == (2, 16)

    llm = LLM(str(tiny_model), quantization="inc", quant_config=str(recipe_calibration.quant_config),
              kv_cache_dtype="fp8_inc", max_model_len=64, skip_warmup=True)
    attn = llm.engine.host.model.model.layers[0].self_attn.attn
    assert attn.softmax.output_scale == pytest.approx(1 / 448, rel=1e-7)      # probabilities <= 1
    assert attn.matmul_qk.scale_b == attn.k_cache.scale and attn.matmul_av.scale_b == attn.v_cache.scale
    maxabs = float(stats["model.layers.0.self_attn.attn.key_maxabs"])
    assert attn.k_cache.scale == pytest.approx(maxabs / 448)                  # of K after smoothing
    assert torch.equal(attn.key_offset, stats["model.layers.0.self_attn.attn.key_offset"])
    q = llm.engine.host.model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.format.fp8_weight(q), w)                                     # the rounded weight runs
    assert q.weight_scale == pytest.approx(float(stats["model.layers.0.self_attn.q_proj.weight_scale"]))


def test_searched_scales_calibrate_on_the_quantized_model(tiny_model, tmp_path):
    """searched_scales needs the input scales MEASURE sets: calibrate runs the statistics pass on the
    plain-scale FP8 model, and every rounded Linear also gets its searched factor, which loads."""
    from safetensors.torch import load_file

    from fp8lm.entrypoints.calibrate import calibrate
    from fp8lm.quant.recipe import FP8LM_OPTIONS
    from fp8lm.quant.statistics import ACTIVATION_CANDIDATES

    result = calibrate(str(tiny_model), "builtin", tmp_path, num_samples=4, max_seq_len=48, max_tokens=2,
                       use_tqdm=False, statistics_tokens=256,
                       quant_overrides={"fp8lm": {**FP8LM_OPTIONS, "searched_scales": True}})
    config = json.loads(result.quant_config.read_text())
    stats = load_file(f"{config['dump_stats_path']}_fp8lm_stats.safetensors")
    rounded = {k[:-len(".weight")] for k in stats if k.endswith(".weight")}
    factors = {k[:-len(".input_scale_factor")] for k in stats if k.endswith(".input_scale_factor")}
    assert rounded == factors and len(rounded) == 14
    assert all(min(abs(float(stats[f"{n}.input_scale_factor"]) - c) for c in ACTIVATION_CANDIDATES) < 1e-6
               for n in factors)
    llm = LLM(str(tiny_model), quantization="inc", quant_config=str(result.quant_config), kv_cache_dtype="fp8_inc",
              max_model_len=64, skip_warmup=True)
    assert llm.generate([{"prompt_token_ids": [3, 4, 5]}], use_tqdm=False)[0].outputs[0].token_ids


def test_recipe_options_are_validated(tiny_model):
    with pytest.raises(FP8LMError, match=r"'fp8lm'.*'gptq'.*allowed: rounded_weights"):
        parse_quant_config({"fp8lm": {"gptq": True}}, "cfg", tiny_model)
    with pytest.raises(FP8LMError, match=r"'fp8lm.softmax_scale': value 'max'.*allowed: measured, bound"):
        parse_quant_config({"fp8lm": {"softmax_scale": "max"}}, "cfg", tiny_model)


def test_missing_statistics_file_is_named(recipe_calibration, tiny_model, tmp_path):
    config = json.loads(recipe_calibration.quant_config.read_text())
    for suffix in (".json", ".npz", "_mod_list.json"):
        src = f"{config['dump_stats_path']}_hooks_maxabs{suffix}"
        (tmp_path / f"m_hooks_maxabs{suffix}").write_bytes(open(src, "rb").read())
    config["dump_stats_path"] = str(tmp_path / "m")
    with pytest.raises(FP8LMError, match=r"m_fp8lm_stats.safetensors: no fp8lm statistics file"):
        LLM(str(tiny_model), quantization="inc", quant_config=config, max_model_len=64, skip_warmup=True)


def test_recipe_folder_round_trips_and_other_loaders_never_clip_keys(recipe_calibration, tiny_model, tmp_path):
    """`fp8lm quantize` of the default recipe: fp8lm reloads the folder to the same outputs (key offsets
    and the smoothed K scale from the sidecar); the folder's own k_scale covers unsmoothed keys."""
    from safetensors.torch import load_file

    from fp8lm import SamplingParams
    from fp8lm.entrypoints.quantize import quantize_to_folder

    config = json.loads(recipe_calibration.quant_config.read_text())
    folder = quantize_to_folder(str(tiny_model), tmp_path / "fp8", config)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    prompts = [[5, 9, 14, 3, 27], [60, 2, 33, 19, 40, 41]]
    in_memory = LLM(str(tiny_model), quantization="inc", quant_config=config, kv_cache_dtype="fp8_inc",
                    max_model_len=64, skip_warmup=True)
    reloaded = LLM(str(folder), max_model_len=64, skip_warmup=True)
    sidecar = json.loads((folder / "fp8lm_quant.json").read_text())["attention_scales"]
    for i, layer in enumerate(reloaded.engine.host.model.model.layers):
        assert sidecar[f"model.layers.{i}.self_attn.attn"]["exact_first_token"] is True
        assert layer.self_attn.attn.exact_first_token and layer.self_attn.attn.first_kv is not None
    for a, b in zip(in_memory.generate(prompts, params, use_tqdm=False), reloaded.generate(prompts, params, use_tqdm=False)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == b.outputs[0].cumulative_logprob
    tensors = load_file(folder / "model.safetensors")
    keys = {}

    def keep(module, args):
        keys["k"] = args[0]
    hook = in_memory.engine.host.model.model.layers[0].self_attn.attn.k_cache.register_forward_pre_hook(keep)
    attn0 = in_memory.engine.host.model.model.layers[0].self_attn.attn
    attn0.adjustment = dataclasses.replace(attn0.adjustment, key_offset=None)      # K itself, as other loaders cache it
    in_memory.engine.score(prompts[1])
    hook.remove()
    assert float(keys["k"].abs().max()) <= float(tensors["model.layers.0.self_attn.k_scale"]) * 448 * (1 + 1e-6)


def test_per_head_scales_equal_each_head_run_with_its_own_scale():
    """A q·k / p·v matmul and a KV cache with one scale per KV head give, head by head, what the
    per-tensor modules give with that head's scale."""
    from fp8lm.quant.fp8_modules import FP8Format, FP8KVCache, FP8Matmul

    fmt = FP8Format(E4M3, 448.0)
    g = torch.Generator().manual_seed(0)
    heads = 3
    a = torch.randn(heads, 2, 5, 16, generator=g) * torch.tensor([0.1, 1.0, 30.0])[:, None, None, None]
    b = torch.randn(heads, 2, 16, 7, generator=g) * torch.tensor([5.0, 0.02, 1.0])[:, None, None, None]
    sa, sb = a.abs().amax(dim=(1, 2, 3)) / 448, b.abs().amax(dim=(1, 2, 3)) / 448
    out = FP8Matmul(fmt, sa, sb)(a, b)
    for h in range(heads):
        assert torch.equal(out[h], FP8Matmul(fmt, float(sa[h]), float(sb[h]))(a[h:h + 1], b[h:h + 1])[0])

    x = torch.randn(6, heads, 16, generator=g) * torch.tensor([0.01, 1.0, 8.0])[None, :, None]
    s = x.abs().amax(dim=(0, 2)) / 448
    cache = torch.zeros(heads, 2, 4, 16, dtype=E4M3)
    slots, tables = torch.tensor([0, 1, 2, 4, 5, 6]), torch.tensor([[0, 1]])
    per_head = FP8KVCache(fmt, s)
    per_head(x, cache, slots)
    fetched = per_head.fetch(cache, tables, torch.float32)
    for h in range(heads):
        one = FP8KVCache(fmt, float(s[h]))
        c = torch.zeros(1, 2, 4, 16, dtype=E4M3)
        one(x[:, h:h + 1], c, slots)
        assert torch.equal(cache[h:h + 1].view(torch.uint8), c.view(torch.uint8))
        assert torch.equal(fetched[h], one.fetch(c, tables, torch.float32)[0])
    whole = FP8KVCache(fmt, float(s.max()))           # one scale: the small heads lose their digits
    c = torch.zeros_like(cache)
    whole(x, c, slots)
    assert not torch.equal(whole.fetch(c, tables, torch.float32), fetched)
    assert not torch.equal(FP8Matmul(fmt, float(sa.max()), float(sb.max()))(a, b), out)


def test_per_head_attention_scales_come_from_each_heads_maximum(recipe_calibration, tiny_model, tmp_path):
    from safetensors.torch import load_file

    from fp8lm.entrypoints.quantize import quantize_to_folder

    config = json.loads(recipe_calibration.quant_config.read_text())
    config["fp8lm"]["per_head_attention_scales"] = True
    stats = load_file(f"{config['dump_stats_path']}_fp8lm_stats.safetensors")
    llm = LLM(str(tiny_model), quantization="inc", quant_config=config, kv_cache_dtype="fp8_inc",
              max_model_len=64, skip_warmup=True)
    prefix = "model.layers.1.self_attn.attn"
    attn = llm.engine.host.model.model.layers[1].self_attn.attn
    smoothed_k = stats[f"{prefix}.smoothed_key_maxabs_per_head"]
    assert smoothed_k.shape == (2,) and float(smoothed_k.max()) == pytest.approx(float(stats[f"{prefix}.key_maxabs"]))
    assert torch.allclose(attn.k_cache.scale, smoothed_k / 448, rtol=1e-6)
    assert torch.allclose(attn.v_cache.scale, stats[f"{prefix}.value_maxabs_per_head"] / 448, rtol=1e-6)
    assert torch.allclose(attn.matmul_qk.scale_a, stats[f"{prefix}.query_maxabs_per_head"] / 448, rtol=1e-6)
    assert torch.equal(attn.matmul_qk.scale_b, attn.k_cache.scale) and torch.equal(attn.matmul_av.scale_b, attn.v_cache.scale)
    assert getattr(attn, "fused_attention", None) is None      # the kernel takes one scale per tensor
    tokens = list(range(3, 40))
    plain = LLM(str(tiny_model), quantization="inc", quant_config=str(recipe_calibration.quant_config),
                kv_cache_dtype="fp8_inc", max_model_len=64, skip_warmup=True)
    logits = llm.engine.score(tokens)
    assert torch.isfinite(logits).all() and not torch.equal(logits, plain.engine.score(tokens))
    with pytest.raises(FP8LMError, match="per-head attention scales .* cannot be written"):
        quantize_to_folder(str(tiny_model), tmp_path / "fp8", config)
    assert not (tmp_path / "fp8").exists()


def test_exact_first_token_keeps_the_sink_beside_the_cache(recipe_calibration, tiny_model, monkeypatch):
    from fp8lm import SamplingParams
    from fp8lm.fp8 import cpu_kernels as ck
    from fp8lm.quant.fused_decode import FusedDecodeStack
    from fp8lm.quant.fused_ops import FusedFP8Attention

    config = json.loads(recipe_calibration.quant_config.read_text())
    assert config["fp8lm"]["exact_first_token"] is True             # the recipe's default
    off = {**config, "fp8lm": {**config["fp8lm"], "exact_first_token": False}}
    common = dict(quantization="inc", kv_cache_dtype="fp8_inc", max_model_len=64, skip_warmup=True)
    llm = LLM(str(tiny_model), quant_config=config, kv_cache_memory=1 << 19, **common)
    model = llm.engine.host.model
    attns = [layer.self_attn.attn for layer in model.model.layers]
    # per block and layer: 16 slots of FP8 K and V, plus one float32 K/V row
    per_block = sum(2 * (16 * 1 + 4) * a.num_kv_heads * a.head_dim for a in attns)
    assert attns[0].k_cache_tensor.shape[1] == (1 << 19) // per_block
    for attn in attns:
        assert attn.exact_first_token and isinstance(attn.fused_attention, FusedFP8Attention)
        assert attn.first_kv.shape == (2, attn.num_kv_heads, attn.k_cache_tensor.shape[1] + 1, attn.head_dim)
    assert isinstance(model.model.fused_decode, FusedDecodeStack)
    tokens = list(range(3, 40))
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1, ignore_eos=True)
    logits = llm.engine.score(tokens)
    fused = llm.generate([{"prompt_token_ids": tokens[:20]}], params, use_tqdm=False)[0].outputs[0]
    plain = LLM(str(tiny_model), quant_config=off, **common)
    assert plain.engine.host.model.model.layers[0].self_attn.attn.first_kv is None
    linear_only = {**config, "blocklist": {"types": ["Matmul", "Softmax", "KVCache"], "names": ["^lm_head$"]}}
    no_fp8_attention = LLM(str(tiny_model), quantization="inc", quant_config=linear_only, max_model_len=64,
                           skip_warmup=True)
    assert not no_fp8_attention.engine.host.model.model.layers[0].self_attn.attn.exact_first_token   # no rows for nothing
    assert torch.isfinite(logits).all() and not torch.equal(logits, plain.engine.score(tokens))
    monkeypatch.setattr(ck, "cpu_kernels", lambda: None)         # the same through the modules
    modules = LLM(str(tiny_model), quant_config=config, **common)
    assert getattr(modules.engine.host.model.model.layers[0].self_attn.attn, "fused_attention", None) is None
    assert torch.allclose(modules.engine.score(tokens), logits, atol=1e-4, rtol=1e-4)
    reference = modules.generate([{"prompt_token_ids": tokens[:20]}], params, use_tqdm=False)[0].outputs[0]
    assert fused.token_ids == reference.token_ids
    assert fused.cumulative_logprob == pytest.approx(reference.cumulative_logprob, abs=1e-4)


def test_calibrate_exact_first_token_flag(tiny_model, tmp_path, capsys):
    from fp8lm.entrypoints.cli import main

    out = tmp_path / "cal"
    assert main(["calibrate", str(tiny_model), "--output", str(out), "--num-samples", "2", "--max-seq-len", "24",
                 "--max-tokens", "2"]) == 0
    config = json.loads((out / "maxabs_quant_cpu.json").read_text())
    assert config["fp8lm"]["exact_first_token"] is True and config["fp8lm"]["rounded_weights"] is True
    off = tmp_path / "off"
    assert main(["calibrate", str(tiny_model), "--output", str(off), "--num-samples", "2", "--max-seq-len", "24",
                 "--max-tokens", "2", "--no-exact-first-token"]) == 0
    assert json.loads((off / "maxabs_quant_cpu.json").read_text())["fp8lm"]["exact_first_token"] is False
    refused = tmp_path / "inc"
    assert main(["calibrate", str(tiny_model), "--output", str(refused), "--recipe", "inc", "--exact-first-token"]) == 2
    assert "--exact-first-token is an option of fp8lm's recipe" in capsys.readouterr().err
    assert not refused.exists()
