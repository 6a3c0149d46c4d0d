"""The QUANTIZE configs `fp8lm calibrate` writes: INC's own recipe, and fp8lm's accuracy-first one.

fp8lm's recipe is a valid INC QUANT_CONFIG (exact per-tensor scales, backoff 1.0, the LM head in
the blocklist) plus an "fp8lm" block that INC ignores: error-compensating weight rounding and
searched input scales (both read from the statistics file), K smoothing, softmax probabilities
scaled from their bound, and the attention matmuls reading K/V on the cache's own grid.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from fp8lm.fp8.gptq import gptq_round, output_error, round_to_nearest
from fp8lm.model.loader import safetensors_files
from fp8lm.quant.config import Fp8lmOptions
from fp8lm.quant.statistics import StatisticsCollector

log = logging.getLogger(__name__)

RECIPES = ("fp8lm", "inc")
WEIGHT_CANDIDATES = (1.0, 0.9, 0.8)                 # factors on the max-abs weight scale
_EXACT = {"rounding_method": "IDENTITY", "backoff": 1.0}
# searched_scales is off: clipping an input below its maximum lowered the weighted rounding error but
# raised perplexity on SmolLM2 (benchmarks/accuracy.py), where the clipped outliers are the tokens
# attention sinks on.
# lm_head_bfloat16: on SmolLM2 the rounded head moved float32's held-out text by mean KL 2e-5 and its
# perplexity by +0.005%; the decode step reads half its bytes (the kept head is ~half of them).
# per_head_attention_scales is off: SmolLM2's heads' maxima differ by at most ~2x within a layer, so a
# scale per KV head changes no value's relative rounding (benchmarks/accuracy.py), and it leaves
# the fused attention kernel (one scale per tensor) for the modules' path.
# exact_first_token is on: it took SmolLM2's mean KL 0.0345 -> 0.0302 (benchmarks/accuracy.py) and
# turned bfloat16's France answer to Paris, for one K/V row per cache block in the model dtype.
RECIPE_OPTIONS = Fp8lmOptions(rounded_weights=True, k_smoothing=True, softmax_scale="bound",
                              attention_scales_from_cache=True, lm_head_bfloat16=True, exact_first_token=True)
FP8LM_OPTIONS = RECIPE_OPTIONS.as_dict()
PLAIN_OPTIONS = Fp8lmOptions().as_dict()


def inc_recipe(prefix: Path) -> dict:
    return {"mode": "QUANTIZE", "observer": "maxabs", "scale_method": "maxabs_hw",
            "allowlist": {"types": [], "names": []}, "blocklist": {"types": [], "names": []},
            "dump_stats_path": str(prefix)}


def fp8lm_recipe(prefix: Path, with_statistics: bool = True) -> dict:
    """Without statistics: the plain-scale model the statistics pass runs on."""
    options = (RECIPE_OPTIONS if with_statistics else RECIPE_OPTIONS.without_statistics()).as_dict()
    return {**inc_recipe(prefix),
            "scale_method": {"default": {"weight": dict(_EXACT), "activation": dict(_EXACT)}},
            "blocklist": {"types": [], "names": ["^lm_head$"]},
            "fp8lm": options}


def _checkpoint_weights(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    wanted, found = {f"{n}.weight" for n in names}, {}
    for path in safetensors_files(folder):
        with safe_open(str(path), "pt") as f:
            for key in wanted & set(f.keys()):
                found[key[:-len(".weight")]] = f.get_tensor(key).float()
    return found


def nearest_choice(weight: torch.Tensor, hessian: torch.Tensor, dtype: torch.dtype, limit: float):
    """(scale [1], round-to-nearest FP8 values, their output error): the scale among
    WEIGHT_CANDIDATES (factors on the max-abs scale) with the least output error."""
    base = weight.abs().amax().clamp(min=2.0 ** -100) / limit
    candidates = {f: round_to_nearest(weight, base * f, dtype, limit) for f in WEIGHT_CANDIDATES}
    errors = {f: output_error(weight, q * base * f, hessian) for f, q in candidates.items()}
    best = min(errors, key=errors.get)
    return (base * best).reshape(1), candidates[best], errors[best]


# A batch of GPTQ problems holds at most this many bytes of float64 second moments.
GPTQ_BATCH_BYTES = 256 << 20


def gptq_rounds(problems: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], dtype: torch.dtype,
                limit: float) -> dict[str, torch.Tensor]:
    """GPTQ's FP8 values for each name's (weight, second moments, scale). Linears that share their
    second moments (one input, one input scale: q/k/v, gate/up) are one problem, their rows stacked
    (GPTQ rounds rows independently, each with its own scale); problems of one shape run as a batch."""
    shared: dict[int, list[str]] = {}
    for name, (_, hessian, _) in problems.items():
        shared.setdefault(id(hessian), []).append(name)
    shapes: dict[tuple, list[list[str]]] = {}
    for names in shared.values():
        rows = sum(problems[n][0].shape[0] for n in names)
        shapes.setdefault((rows, problems[names[0]][0].shape[1]), []).append(names)
    rounded: dict[str, torch.Tensor] = {}
    for (_, cols), groups in shapes.items():
        step = max(1, GPTQ_BATCH_BYTES // (8 * cols * cols))
        for i in range(0, len(groups), step):
            batch = groups[i:i + step]
            weights = torch.stack([torch.cat([problems[n][0] for n in names]) for names in batch])
            scales = torch.stack([torch.cat([problems[n][2].expand(problems[n][0].shape[0]) for n in names])
                                  for names in batch])
            hessians = torch.stack([problems[names[0]][1] for names in batch])
            q = gptq_round(weights, hessians, scales[..., None], dtype, limit)
            for names, values in zip(batch, q):
                for n, part in zip(names, values.split([problems[n][0].shape[0] for n in names])):
                    rounded[n] = part
    return rounded


def statistics_tensors(collector: StatisticsCollector, model_folder: Path) -> dict[str, torch.Tensor]:
    """What the statistics file holds, from a finished statistics pass."""
    tensors: dict[str, torch.Tensor] = {}
    weights = _checkpoint_weights(model_folder, list(collector.linears))
    nearest, problems, float_hessians = {}, {}, {}
    for name, stats in collector.linears.items():
        if stats.candidate_error is not None:
            tensors[f"{name}.input_scale_factor"] = torch.tensor([stats.best_activation_factor()])
        if name in weights:         # not e.g. a tied LM head: that keeps round-to-nearest
            fmt, hessian = stats.fmt, stats.hessian
            h32 = float_hessians.setdefault(id(hessian), hessian.float())
            scale, q, err = nearest_choice(weights[name], h32, fmt.dtype, fmt.limit)
            nearest[name], problems[name] = (q, err), (weights[name], hessian, scale)
    gains = []
    if problems:
        fmt = next(iter(collector.linears.values())).fmt
        for name, rounded in gptq_rounds(problems, fmt.dtype, fmt.limit).items():
            weight, hessian, scale = problems[name]
            err = output_error(weight, rounded * scale, float_hessians[id(hessian)])
            q, err_nearest = nearest[name]
            tensors[f"{name}.weight"] = (q if err >= err_nearest else rounded).to(fmt.dtype)
            tensors[f"{name}.weight_scale"] = scale.float()
            gains.append(err / err_nearest if err_nearest > 0 else 1.0)
            tensors[f"{name}.gptq_error_ratio"] = torch.tensor([gains[-1]])     # < 1: GPTQ's weight is used
    for name, keys in collector.keys.items():
        if keys.low is not None:
            tensors[f"{name}.key_offset"] = keys.offset()
            tensors[f"{name}.key_maxabs"] = torch.tensor([keys.smoothed_maxabs()])
            tensors[f"{name}.key_maxabs_per_head"] = keys.maxabs_per_head(smoothed=False)
            tensors[f"{name}.smoothed_key_maxabs_per_head"] = keys.maxabs_per_head(smoothed=True)
    for name, heads in collector.heads.items():
        if heads.maxabs is not None:
            tensors[f"{name}_maxabs_per_head"] = heads.maxabs
    if gains:
        log.info("error-compensating rounding: output error %.2fx round-to-nearest's (mean over %d Linears)",
                 sum(gains) / len(gains), len(gains))
    return tensors
