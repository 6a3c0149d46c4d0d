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
from fp8lm.model.attention import CacheAdjustment
from fp8lm.quant.fp8_linear import is_fp8
from fp8lm.quant.fp8_modules import FP8KVCache, FP8Matmul, FP8Softmax
from fp8lm.quant.modules import replace_module

FP8_ATTENTION = (FP8Matmul, FP8Softmax, FP8KVCache)


@dataclass
class ModuleError:
    name: str
    signal: float = 0.0
    noise: float = 0.0

    @property
    def sqnr_db(self) -> float:
        return math.inf if self.noise == 0 else 10 * math.log10(self.signal / self.noise)


def fp8_twins(quantized: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in quantized.named_modules() if is_fp8(m) or isinstance(m, FP8_ATTENTION)}


def module_sqnr(reference_engine, quantized_engine, windows) -> list[ModuleError]:
    """Runs the reference model; at every quantized module, its FP8 twin sees the same input."""
    twins = fp8_twins(quantized_engine.host.model)
    errors = {name: ModuleError(name) for name in twins}
    handles = []
    for name, twin in twins.items():
        module = reference_engine.host.model.get_submodule(name)

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
    pairs = list(zip(reference_engine.host.model.attention_layers(), quantized_engine.host.model.attention_layers()))
    for ref_attn, q_attn in pairs:
        ref_attn.adjustment = CacheAdjustment(key_offset=q_attn.key_offset)
    try:
        for w in windows:
            reference_engine.score(w)
    finally:
        for h in handles:
            h.remove()
        for ref_attn, _ in pairs:
            ref_attn.adjustment = CacheAdjustment()
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
    fp8 = {n for n, m in model.named_modules() if is_fp8(m)}
    return {u: [n for n in names if n in fp8] for u, names in units.items() if any(n in fp8 for n in names)}


def attention_units(model: nn.Module) -> dict[str, list[str]]:
    """Each decoder layer's FP8 attention as one unit ("model.layers.N.self_attn.attn"): its q·k,
    softmax, p·v and K/V cache, kept in high precision together (the cache then in the model dtype)."""
    units: dict[str, list[str]] = {}
    for i, layer in enumerate(model.model.layers):
        unit = f"model.layers.{i}.self_attn.attn"
        names = [f"{unit}.{n}" for n, m in layer.self_attn.attn.named_children() if isinstance(m, FP8_ATTENTION)]
        if names:
            units[unit] = names
    return units


def is_attention_unit(unit: str) -> bool:
    return unit.endswith(".attn")


def unit_pattern(unit: str) -> str:
    """The blocklist name pattern of a unit (a layer's attention projections leave its attention ops
    to their own unit)."""
    if unit == "lm_head":
        return "^lm_head$"
    if is_attention_unit(unit):
        return re.escape(unit) + r"\."
    group = unit.rpartition(".")[2]
    return re.escape(unit) + (r"\.[qkvo]_proj$" if group == "self_attn" else r"\.")


class HighPrecisionSwapper:
    """Puts the high-precision originals of chosen units into the quantized model (and back). An
    attention unit kept also gets K/V caches of the reference's dtype (empty: every step scored
    writes the K/V it reads) and the reference layer's attention kernel, and its FP8 caches and
    kernel back when it is put back."""

    def __init__(self, quantized: nn.Module, reference: nn.Module, units: dict[str, list[str]]):
        self.quantized, self.units = quantized, units
        self.fp8 = {n: quantized.get_submodule(n) for names in units.values() for n in names}
        self.originals = {n: reference.get_submodule(n) for n in self.fp8}
        self.reference = reference
        self.fp8_attention: dict[str, tuple] = {}      # unit -> its FP8 K cache, V cache, fused_attention

    def keep(self, kept: set[str]) -> None:
        for unit, names in self.units.items():
            for n in names:
                replace_module(self.quantized, n, self.originals[n] if unit in kept else self.fp8[n])
            if is_attention_unit(unit):
                self._bind_caches(unit, unit in kept)

    def _bind_caches(self, unit: str, high_precision: bool) -> None:
        attn = self.quantized.get_submodule(unit)
        if high_precision and unit not in self.fp8_attention:
            self.fp8_attention[unit] = (attn.k_cache_tensor, attn.v_cache_tensor, attn.fused_attention)
            original = self.reference.get_submodule(unit)
            dtype = original.k_cache_tensor.dtype
            attn.bind_cache(torch.zeros_like(attn.k_cache_tensor, dtype=dtype),
                            torch.zeros_like(attn.v_cache_tensor, dtype=dtype), attn.first_kv)
            attn.fused_attention = original.fused_attention
        elif not high_precision and unit in self.fp8_attention:
            k_cache, v_cache, attn.fused_attention = self.fp8_attention.pop(unit)
            attn.bind_cache(k_cache, v_cache, attn.first_kv)


@dataclass
class Sensitivity:
    baseline_ppl: float
    all_fp8_pct: float
    unit_gain_kl: dict[str, float]           # mean-KL decrease when only that unit is kept in high precision
    unit_share: dict[str, float]             # Linear units: their share of the decoder's FP8 Linear weights;
                                             # attention units: 1 / the number of layers
    blocklist: list[str]                     # units kept, best gain per price first
    with_blocklist_pct: float
    with_blocklist_bound_pct: float          # the same at BUDGET_Z standard errors above (what the budget checks)

    def blocklist_names(self) -> list[str]:
        return [unit_pattern(u) for u in self.blocklist]

    @property
    def kept_share(self) -> float:
        """The decoder's Linear weights kept in high precision (a share)."""
        return sum(self.unit_share[u] for u in self.blocklist if u != "lm_head" and not is_attention_unit(u))

    @property
    def kept_attention_share(self) -> float:
        """The layers whose attention and K/V cache are kept in high precision (a share)."""
        return sum(self.unit_share[u] for u in self.blocklist if is_attention_unit(u))


# One-sided 95%: a few calibration windows measure the perplexity change to ~±0.7 points (SmolLM2, 8
# windows of 256), and stopping at the first point estimate under the budget picked the noise that
# favoured it (1.0% on the samples, +2.9% on held-out text).
BUDGET_Z = 1.645


def sensitivity(reference_engine, quantized_engine, windows, max_increase_pct: float,
                max_weight_share: float = 0.15, max_attention_share: float = 0.3) -> Sensitivity:
    """Each unit's measured gain (mean KL to the reference, which is far steadier than perplexity on
    a few windows) when kept alone; then units by gain per price until the quantized model's
    perplexity, BUDGET_Z standard errors above its estimate, is at most `max_increase_pct` above the
    reference's. Units are every layer's attention projections and MLP (their price: their share of
    the decoder's Linear weights, at most `max_weight_share` kept), every layer's attention with its
    K/V cache (price: its share of the layers, at most `max_attention_share` kept: the cache bytes
    and the unfused attention it costs), and the LM head; a unit's price is its share of its cap,
    so the two kinds compete on one scale. The gains are measured on the even windows and the
    perplexity on the odd ones (both on the one window there is, if only one): ranked and checked
    on the same tokens, the units chosen are those that happened to help on them, and the estimate
    is biased towards the budget."""
    ranking, checking = (range(0, len(windows), 2), range(1, len(windows), 2)) if len(windows) > 1 else ([0], [0])
    model = quantized_engine.host.model
    linears, attention = linear_units(model), (attention_units(model) if max_attention_share > 0 else {})
    sizes = {u: sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in names)
             for u, names in linears.items()}
    decoder = sum(v for u, v in sizes.items() if u != "lm_head")
    share = {**{u: v / decoder for u, v in sizes.items()}, **{u: 1 / len(model.model.layers) for u in attention}}
    cap = {u: max_attention_share if is_attention_unit(u) else max_weight_share for u in share}
    swapper = HighPrecisionSwapper(model, reference_engine.host.model, {**linears, **attention})
    reference = list(reference_logprobs(reference_engine, windows))

    def measure(kept, on) -> Comparison:
        swapper.keep(set(kept))
        return compare([reference[i] for i in on], quantized_engine, [windows[i] for i in on])

    def fits(unit, kept) -> bool:
        same_kind = [u for u in kept if is_attention_unit(u) == is_attention_unit(unit) and u != "lm_head"]
        return unit == "lm_head" or sum(share[u] for u in same_kind) + share[unit] <= cap[unit] + 1e-9

    try:
        everything, ranked_all = measure([], checking), measure([], ranking).mean_kl
        gain = {u: ranked_all - measure([u], ranking).mean_kl for u in share}
        kept: list[str] = []
        current = everything
        price = {u: share[u] / (cap[u] or 1.0) for u in share}     # cap 0: nothing of that kind fits
        for unit in sorted(share, key=lambda u: gain[u] / price[u], reverse=True):
            if current.ppl_change_bound_pct(BUDGET_Z) <= max_increase_pct or gain[unit] <= 0:
                break
            if not fits(unit, kept):
                continue
            kept.append(unit)
            current = measure(kept, checking)
    finally:
        swapper.keep(set())
    return Sensitivity(everything.reference.value, everything.ppl_change_pct, gain, share, kept,
                       current.ppl_change_pct, current.ppl_change_bound_pct(BUDGET_Z))
