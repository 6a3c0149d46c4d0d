"""fp8lm's calibration statistics, beside INC's measurement files: what the accuracy-first recipe
needs beyond a maximum per tensor.

Collected in MEASURE's own prefill over the calibration text, on the high-precision model (one pass
for both), or, where the searched input scales need each Linear's input scale, in a second pass on
the model already quantized with the recipe's plain scales:
- per Linear the recipe quantizes: H = XᵀX of its input (error-compensating weight rounding): of
  the high-precision input in MEASURE's pass, of its FP8 values (X_qᵀX_q) on the quantized model;
  and there, per candidate input scale, its input's rounding error weighted by the weight's column
  norms (the output error the candidate causes, for the scale search);
- per attention layer: each key channel's min and max (after rotary), for K smoothing, and the
  maximum |value| of q·k's queries and of V per KV head, for per-head attention scales.

Written as `<dump_stats_path>_fp8lm_stats.safetensors`: the rounded FP8 weights with their scales
(and GPTQ's output error relative to round-to-nearest's), the input scales' searched factors, each
attention layer's key offset and the key maximum after smoothing, and the per-KV-head maxima of
queries, keys (with and without smoothing) and values. INC's files are untouched.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fp8lm.errors import FP8LMError
from fp8lm.files import replace_durably
from fp8lm.fp8.cpu_kernels import kernels_for
from fp8lm.fp8.numerics import fake_quant, gram_from_upper_blocks
from fp8lm.model.attention import PagedAttention
from fp8lm.model.linear import ParallelLinear
from fp8lm.quant.fp8_linear import is_fp8

ACTIVATION_CANDIDATES = (1.0, 0.9, 0.8, 0.7)      # factors on the max-abs scale (clipping)


def fp8_second_moment(x: torch.Tensor, scale, fmt) -> torch.Tensor:
    """X_qᵀX_q (float32) of x [T, K]'s FP8 values at the per-tensor `scale`, times the scale: on the
    CPU kernels' W8A8 GEMM where they run (bfloat16 dot products on AVX-512 BF16), else in torch."""
    kernels = kernels_for(x.device)
    if kernels is not None and torch.as_tensor(scale).numel() == 1:
        return kernels.fp8_gram(x, float(scale), fmt.dtype, fmt.limit)
    xq = fake_quant(x, 1 / scale, fmt.dtype, fmt.limit) * scale
    return xq.T @ xq


# XᵀX in 4 column blocks: 0.66-0.8x the time of x.T @ x at 2,048 rows of 576 / 1,536 (one thread, AVX2);
# 2 blocks 0.75-0.83x, 6 slower again.
FLOAT32_GRAM_BLOCKS = 4


def float32_gram(x: torch.Tensor) -> torch.Tensor:
    """XᵀX of x [T, K] (its dtype): the blocks on and above the diagonal only, mirrored."""
    k = x.shape[1]
    return gram_from_upper_blocks(k, -(-k // FLOAT32_GRAM_BLOCKS), lambda start, end: x[:, start:end].T @ x[:, start:])


def stats_path(stats_prefix: Path) -> Path:
    return Path(f"{stats_prefix}_fp8lm_stats.safetensors")


class LinearStatistics:
    """H of one Linear's input. `fmt`: the FP8 format QUANTIZE will give a high-precision `module`
    (H = XᵀX of its high-precision input); None: `module` is FP8 already (H = X_qᵀX_q of its input's
    FP8 values at its input scale). `search_scales`: also each candidate input scale's weighted
    rounding error (four more casts of every input; only the searched_scales option reads them; FP8
    modules only). `hessian`: another Linear's accumulator, where both read one input (q/k/v,
    gate/up; at one input scale): their H is one tensor, added to once per input (by the Linear that
    owns it)."""

    def __init__(self, module: ParallelLinear, search_scales: bool = True, hessian: torch.Tensor | None = None,
                 fmt=None):
        self.module = module
        self.fmt = module.format.fmt if fmt is None else fmt
        self.input_scale = module.input_scale if fmt is None else None
        self.owns_hessian = hessian is None
        self.hessian = torch.zeros(module.in_features, module.in_features, dtype=torch.float64) \
            if hessian is None else hessian
        self.candidate_error = None
        if search_scales:
            if self.input_scale is None:
                raise FP8LMError("the input-scale search observes the model quantized with its input scales")
            weight = module.dense_weight().float()
            self.column_norms = weight.pow(2).sum(dim=0).double()
            self.candidate_error = torch.zeros(len(ACTIVATION_CANDIDATES), dtype=torch.float64)

    @property
    def observes(self) -> bool:
        return self.owns_hessian or self.candidate_error is not None

    def update(self, x: torch.Tensor) -> None:
        fmt = self.fmt
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.owns_hessian:
            second = float32_gram(x) if self.input_scale is None else fp8_second_moment(x, self.input_scale, fmt)
            self.hessian += second.double().cpu()           # H stays on the CPU, where GPTQ runs
        if self.candidate_error is None:
            return
        for i, f in enumerate(ACTIVATION_CANDIDATES):
            s = self.input_scale * f
            err = (fake_quant(x, 1 / s, fmt.dtype, fmt.limit) * s - x).double().pow(2).sum(dim=0)
            self.candidate_error[i] += float(err @ self.column_norms)

    def best_activation_factor(self) -> float:
        return ACTIVATION_CANDIDATES[int(torch.argmin(self.candidate_error))]


class KeyStatistics:
    def __init__(self):
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def update(self, k: torch.Tensor) -> None:
        k = k.detach().float()                      # [T, kv_heads, head_dim]
        low, high = k.amin(dim=0), k.amax(dim=0)
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)

    def offset(self) -> torch.Tensor:
        """Each channel's midpoint: subtracting it centres the channel, so its largest |value| halves
        its range; softmax is unchanged (every score of a row shifts by q·offset)."""
        return (self.low + self.high) / 2

    def smoothed_maxabs(self) -> float:
        return float(self.maxabs_per_head(smoothed=True).max())

    def maxabs_per_head(self, smoothed: bool) -> torch.Tensor:
        """[kv_heads]: the largest |key| of each head, after smoothing or as cached without it."""
        per_channel = (self.high - self.low) / 2 if smoothed else torch.maximum(self.low.abs(), self.high.abs())
        return per_channel.amax(dim=-1)


class HeadStatistics:
    """The maximum |value| per KV head of a tensor whose axis `head_axis` is the KV head."""

    def __init__(self, head_axis: int):
        self.head_axis = head_axis
        self.maxabs: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().abs().movedim(self.head_axis, 0)
        m = x.reshape(x.shape[0], -1).amax(dim=1)
        self.maxabs = m if self.maxabs is None else torch.maximum(self.maxabs, m)


class StatisticsCollector:
    """Hooks on the Linears to round and on every attention layer (its keys, q·k's queries, V) of
    `model`: with `planned` (name -> the FP8 format QUANTIZE will give it), a high-precision model's
    Linears of those names; without, the FP8 Linears with a static input scale of a quantized one."""

    def __init__(self, model: nn.Module, search_scales: bool = True, planned: dict | None = None):
        self.linears: dict[str, LinearStatistics] = {}
        self.keys: dict[str, KeyStatistics] = {}
        self.heads: dict[str, HeadStatistics] = {}      # "<attention>.query" / "<attention>.value"
        self._handles = []
        if planned is None:
            planned = {n: None for n, m in model.named_modules() if is_fp8(m) and m.input_scale is not None}
            same_input = shared_inputs(model)
        else:
            same_input = {n: group[0][0] for group in model.projection_groups()
                          if all(name in planned for name, _ in group) for n, _ in group[1:]}
        for name, module in model.named_modules():
            if name in planned:
                owner = self.linears.get(same_input.get(name, name))
                stats = self.linears[name] = LinearStatistics(module, search_scales,
                                                              None if owner is None else owner.hessian, planned[name])
                if stats.observes:
                    self._handles.append(module.register_forward_pre_hook(
                        lambda m, args, s=stats: s.update(args[0])))
        for name, module in model.named_modules():
            if isinstance(module, PagedAttention):
                self.keys[name] = KeyStatistics()
                self.heads[f"{name}.query"], self.heads[f"{name}.value"] = HeadStatistics(1), HeadStatistics(1)
                # A hook on the layer itself, not on its caches and matmuls: the fused attention
                # kernel still runs (it would bypass those modules' hooks).
                self._handles.append(module.register_forward_pre_hook(
                    lambda m, args, n=name: self._observe_attention(m, n, *args[:3])))

    def _observe_attention(self, attn: PagedAttention, name: str, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor) -> None:
        """K as the cache stores it (after the key offset), q·k's queries (q times the score scale; the
        heads of one KV head stacked) and V, all [T, kv_heads, ...]."""
        self.keys[name].update(k if attn.key_offset is None else k - attn.key_offset)
        self.heads[f"{name}.query"].update((q * attn.scale).reshape(q.shape[0], attn.num_kv_heads, -1))
        self.heads[f"{name}.value"].update(v)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def shared_inputs(model: nn.Module) -> dict[str, str]:
    """Static FP8 Linears that read one input at one input scale (a module's `fusable_projections`):
    each one after the first -> the first's name."""
    first: dict[str, str] = {}
    for members in model.projection_groups():
        lead = members[0][1]
        if all(is_fp8(m) and m.input_scale is not None and torch.equal(
                torch.as_tensor(m.input_scale), torch.as_tensor(lead.input_scale)) for _, m in members):
            first.update({n: members[0][0] for n, _ in members[1:]})
    return first


def save_statistics(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    replace_durably([(tmp, path)])


def load_statistics(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FP8LMError(f"{path}: no fp8lm statistics file; the QUANT_CONFIG's \"fp8lm\" options need it "
                         "(run fp8lm calibrate, or remove those options)")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise FP8LMError(f"{path}: not a readable safetensors file ({e})") from None
