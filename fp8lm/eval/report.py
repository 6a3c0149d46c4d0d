"""Where FP8 hurts: per-module SQNR of each FP8 module against high precision on the same input,
and per-layer perplexity sensitivity with the blocklist that buys the most for the fewest layers."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from fp8lm.eval.perplexity import perplexity
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
    try:
        for w in windows:
            reference_engine.score(w)
    finally:
        for h in handles:
            h.remove()
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


# ---- per-layer sensitivity ------------------------------------------------------------------------

def layer_units(model: nn.Module) -> list[str]:
    """Units a blocklist can keep in high precision: each decoder layer, and the LM head."""
    return [f"model.layers.{i}." for i in range(len(model.model.layers))] + ["lm_head"]


def unit_pattern(unit: str) -> str:
    return re.escape(unit) if unit != "lm_head" else "^lm_head$"


class ModuleSwapper:
    """Puts the FP8 twins of chosen units into the reference model (and back). KV caches stay as
    they are: their storage dtype is fixed when the cache is allocated."""

    def __init__(self, reference: nn.Module, quantized: nn.Module):
        self.reference = reference
        self.twins = {n: m for n, m in fp8_twins(quantized).items() if not isinstance(m, FP8KVCache)}
        self.originals = {n: reference.get_submodule(n) for n in self.twins}

    def use_fp8(self, units_in_fp8: set[str]) -> None:
        for name in self.twins:
            in_fp8 = any(name.startswith(u) if u != "lm_head" else name == "lm_head" for u in units_in_fp8)
            replace_module(self.reference, name, self.twins[name] if in_fp8 else self.originals[name])


@dataclass
class Sensitivity:
    baseline_ppl: float
    unit_cost_pct: dict[str, float]          # ppl increase when only that unit is FP8
    all_fp8_pct: float
    blocklist: list[str]                     # units kept in high precision
    with_blocklist_pct: float

    def blocklist_names(self) -> list[str]:
        return [unit_pattern(u) for u in self.blocklist]


def sensitivity(reference_engine, quantized_engine, windows, max_increase_pct: float, max_units: int = 8) -> Sensitivity:
    swapper = ModuleSwapper(reference_engine.model, quantized_engine.model)
    units = layer_units(reference_engine.model)
    base = perplexity(reference_engine, windows).value

    def cost(fp8_units) -> float:
        swapper.use_fp8(set(fp8_units))
        return 100 * (perplexity(reference_engine, windows).value / base - 1)

    try:
        unit_cost = {u: cost([u]) for u in units}
        all_pct = cost(units)
        kept: list[str] = []
        current = all_pct
        for unit in sorted(units, key=unit_cost.get, reverse=True)[:max_units]:
            if current <= max_increase_pct:
                break
            kept.append(unit)
            current = cost([u for u in units if u not in kept])
    finally:
        swapper.use_fp8(set())
    return Sensitivity(base, unit_cost, all_pct, kept, current)
