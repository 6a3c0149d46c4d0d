"""Where FP8 hurts: per-module SQNR of each FP8 module against high precision on the same input,
and per-layer perplexity sensitivity with the blocklist that buys the most for the fewest layers."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from fp8lm.eval.perplexity import Comparison, compare, reference_logprobs
from fp8lm.fp8.numerics import fake_quant
from fp8lm.quant.fp8_modules import FP8KVCache, FP8Linear, FP8Matmul, FP8Softmax
from fp8lm.quant.modules import replace_module

FP8_TYPES = (FP8Linear, FP8Matmul, FP8Softmax, FP8KVCache)


@dataclass
class ModuleError:
    name: str
    signal: float = 0.0
    noise: float = 0.0

    @property
    def sqnr_db(self) -> float:
        return math.inf if self.noise == 0 else 10 * math.log10(self.signal / self.noise)


def fp8_twins(quantized: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in quantized.named_modules() if isinstance(m, FP8_TYPES)}


def module_sqnr(reference_engine, quantized_engine, windows) -> list[ModuleError]:
    """Runs the reference model; at every quantized module, its FP8 twin sees the same input."""
    twins = fp8_twins(quantized_engine.model)
    errors = {name: ModuleError(name) for name in twins}
    handles = []
    for name, twin in twins.items():
        module = reference_engine.model.get_submodule(name)

        def hook(mod, args, out, twin=twin, err=errors[name]):
            with torch.no_grad():
                if isinstance(twin, FP8KVCache):   # what the cache gives back after its FP8 round trip
                    approx = fake_quant(args[0], 1 / twin.scale, twin.fmt.dtype, twin.fmt.limit) * twin.scale
                else:
                    approx = twin(*args)
                err.signal += float(out.double().pow(2).sum())
                err.noise += float((out.double() - approx.double()).pow(2).sum())

        handles.append(module.register_forward_hook(hook))
    # The reference takes the quantized model's key offsets (exact for it), so that its caches and
    # q·k hand the twins the smoothed keys they were scaled for.
    pairs = list(zip(reference_engine.model.attention_layers(), quantized_engine.model.attention_layers()))
    for ref_attn, q_attn in pairs:
        ref_attn.key_offset = q_attn.key_offset
    try:
        for w in windows:
            reference_engine.score(w)
    finally:
        for h in handles:
            h.remove()
        for ref_attn, _ in pairs:
            ref_attn.key_offset = None
    return list(errors.values())


def write_sqnr_report(errors: list[ModuleError], path_prefix: str, worst: int = 10) -> tuple[str, str]:
    """Writes <prefix>.md (table, worst first) and <prefix>.png (bars in model order, worst in red)."""
    from fp8lm.eval.png import bar_chart

    ranked = sorted(errors, key=lambda e: e.sqnr_db)
    worst_names = {e.name for e in ranked[:worst]}
    lines = ["| module | SQNR (dB) |", "|---|---|"] + [f"| {e.name} | {e.sqnr_db:.2f} |" for e in ranked]
    with open(f"{path_prefix}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    finite = [e.sqnr_db if math.isfinite(e.sqnr_db) else 100.0 for e in errors]
    bar_chart(finite, [e.name in worst_names for e in errors], f"{path_prefix}.png")
    return f"{path_prefix}.md", f"{path_prefix}.png"


# ---- mixed precision to a budget -------------------------------------------------------------------

LINEAR_GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def linear_units(model: nn.Module) -> dict[str, list[str]]:
    """Units a blocklist can keep in high precision, each with its FP8 Linears: every decoder layer's
    attention projections, its MLP, and the LM head."""
    units: dict[str, list[str]] = {}
    for i in range(len(model.model.layers)):
        for group, names in LINEAR_GROUPS.items():
            units[f"model.layers.{i}.{group}"] = [f"model.layers.{i}.{group}.{n}" for n in names]
    units["lm_head"] = ["lm_head"]
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    return {u: [n for n in names if n in fp8] for u, names in units.items() if any(n in fp8 for n in names)}


def unit_pattern(unit: str) -> str:
    """The blocklist name pattern of a unit (the attention ops under self_attn.attn stay FP8)."""
    if unit == "lm_head":
        return "^lm_head$"
    group = unit.rpartition(".")[2]
    return re.escape(unit) + (r"\.[qkvo]_proj$" if group == "self_attn" else r"\.")


class HighPrecisionSwapper:
    """Puts the high-precision originals of chosen units into the quantized model (and back); its
    FP8 attention and KV cache stay as they are."""

    def __init__(self, quantized: nn.Module, reference: nn.Module, units: dict[str, list[str]]):
        self.quantized, self.units = quantized, units
        self.fp8 = {n: quantized.get_submodule(n) for names in units.values() for n in names}
        self.originals = {n: reference.get_submodule(n) for n in self.fp8}

    def keep(self, kept: set[str]) -> None:
        for unit, names in self.units.items():
            for n in names:
                replace_module(self.quantized, n, self.originals[n] if unit in kept else self.fp8[n])


@dataclass
class Sensitivity:
    baseline_ppl: float
    all_fp8_pct: float
    unit_gain_kl: dict[str, float]           # mean-KL decrease when only that unit is kept in high precision
    unit_share: dict[str, float]             # the unit's share of the decoder's FP8 Linear weights
    blocklist: list[str]                     # units kept, best gain per byte first
    with_blocklist_pct: float
    with_blocklist_bound_pct: float          # the same at BUDGET_Z standard errors above (what the budget checks)

    def blocklist_names(self) -> list[str]:
        return [unit_pattern(u) for u in self.blocklist]

    @property
    def kept_share(self) -> float:
        return sum(self.unit_share[u] for u in self.blocklist if u != "lm_head")


# One-sided 95%: a few calibration windows measure the perplexity change to ~±0.7 points (SmolLM2, 8
# windows of 256), and stopping at the first point estimate under the budget picked the noise that
# favoured it (1.0% on the samples, +2.9% on held-out text).
BUDGET_Z = 1.645


def sensitivity(reference_engine, quantized_engine, windows, max_increase_pct: float,
                max_weight_share: float = 0.15) -> Sensitivity:
    """Each unit's measured gain (mean KL to the reference, which is far steadier than perplexity on
    a few windows) when kept alone; then units by gain per byte until the quantized model's
    perplexity, BUDGET_Z standard errors above its estimate, is at most `max_increase_pct` above the
    reference's, or the next unit would exceed `max_weight_share` of the decoder's Linear weights.
    The gains are measured on the even windows and the perplexity on the odd ones (both on the one
    window there is, if only one): ranked and checked on the same tokens, the units chosen are those
    that happened to help on them, and the estimate is biased towards the budget."""
    ranking, checking = (range(0, len(windows), 2), range(1, len(windows), 2)) if len(windows) > 1 else ([0], [0])
    units = linear_units(quantized_engine.model)
    sizes = {u: sum(quantized_engine.model.get_submodule(n).in_features * quantized_engine.model.get_submodule(n)
                    .out_features for n in names) for u, names in units.items()}
    decoder = sum(v for u, v in sizes.items() if u != "lm_head")
    share = {u: v / decoder for u, v in sizes.items()}
    swapper = HighPrecisionSwapper(quantized_engine.model, reference_engine.model, units)
    reference = list(reference_logprobs(reference_engine, windows))

    def measure(kept, on) -> Comparison:
        swapper.keep(set(kept))
        return compare([reference[i] for i in on], quantized_engine, [windows[i] for i in on])

    try:
        everything, ranked_all = measure([], checking), measure([], ranking).mean_kl
        gain = {u: ranked_all - measure([u], ranking).mean_kl for u in units}
        kept: list[str] = []
        current = everything
        for unit in sorted(units, key=lambda u: gain[u] / sizes[u], reverse=True):
            if current.ppl_change_bound_pct(BUDGET_Z) <= max_increase_pct or gain[unit] <= 0:
                break
            if unit != "lm_head" and sum(share[u] for u in kept if u != "lm_head") + share[unit] > max_weight_share:
                continue
            kept.append(unit)
            current = measure(kept, checking)
    finally:
        swapper.keep(set())
    return Sensitivity(everything.reference.value, everything.ppl_change_pct, gain, share, kept,
                       current.ppl_change_pct, current.ppl_change_bound_pct(BUDGET_Z))
