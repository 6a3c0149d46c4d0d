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
FP8LM_OPTIONS = {"rounded_weights": True, "searched_scales": False, "k_smoothing": True,
                 "softmax_scale": "bound", "attention_scales_from_cache": True, "lm_head_bfloat16": True,
                 "per_head_attention_scales": False, "exact_first_token": True}
PLAIN_OPTIONS = {"rounded_weights": False, "searched_scales": False, "k_smoothing": False,
                 "softmax_scale": "measured", "attention_scales_from_cache": False, "lm_head_bfloat16": False,
                 "per_head_attention_scales": False, "exact_first_token": False}


def inc_recipe(prefix: Path) -> dict:
    return {"mode": "QUANTIZE", "observer": "maxabs", "scale_method": "maxabs_hw",
            "allowlist": {"types": [], "names": []}, "blocklist": {"types": [], "names": []},
            "dump_stats_path": str(prefix)}


def fp8lm_recipe(prefix: Path, with_statistics: bool = True) -> dict:
    """Without statistics: the plain-scale model the statistics pass runs on."""
    options = dict(FP8LM_OPTIONS)
    if not with_statistics:
        options.update(rounded_weights=False, searched_scales=False, k_smoothing=False)
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


def rounded_linear(weight: torch.Tensor, hessian: torch.Tensor, dtype: torch.dtype, limit: float):
    """(FP8 values, scale, GPTQ's output error, round-to-nearest's output error at that scale): the
    scale searched among WEIGHT_CANDIDATES by output error, then GPTQ unless it loses to rounding."""
    base = weight.abs().amax().clamp(min=2.0 ** -100) / limit
    candidates = {f: round_to_nearest(weight, base * f, dtype, limit) for f in WEIGHT_CANDIDATES}
    errors = {f: output_error(weight, q * base * f, hessian) for f, q in candidates.items()}
    best = min(errors, key=errors.get)
    scale, nearest, err_nearest = (base * best).reshape(1), candidates[best], errors[best]
    rounded = gptq_round(weight, hessian, scale, dtype, limit)
    err = output_error(weight, rounded * scale, hessian)
    return (nearest if err >= err_nearest else rounded), scale, err, err_nearest


def statistics_tensors(collector: StatisticsCollector, model_folder: Path) -> dict[str, torch.Tensor]:
    """What the statistics file holds, from a finished statistics pass."""
    tensors: dict[str, torch.Tensor] = {}
    weights = _checkpoint_weights(model_folder, list(collector.linears))
    gains = []
    for name, stats in collector.linears.items():
        module = stats.module
        tensors[f"{name}.input_scale_factor"] = torch.tensor([stats.best_activation_factor()])
        if name not in weights:
            continue            # e.g. a tied LM head: keeps round-to-nearest
        q, scale, err, err_nearest = rounded_linear(weights[name], stats.hessian, module.fmt.dtype, module.fmt.limit)
        tensors[f"{name}.weight"] = q.to(module.fmt.dtype)
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
