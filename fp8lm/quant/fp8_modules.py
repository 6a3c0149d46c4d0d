"""The FP8 modules the patcher swaps in for Matmul, Softmax and KVCache (a Linear keeps its module
and gets an FP8 weight format: quant/fp8_linear.py).

Scales follow the convention value ≈ fp8 * scale. With scale_format SCALAR they are Python
floats; with CONST (forced for per-channel and dynamic scales) registered buffers. Both give the
same outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fp8lm.fp8.cpu_kernels import kernels_for
from fp8lm.fp8.numerics import fake_quant, to_fp8
from fp8lm.model.layers import KVCache, Matmul, Softmax


@dataclass(frozen=True)
class FP8Format:
    dtype: torch.dtype
    limit: float                 # the profile's full scale (240 for gaudi2 E4M3, 448 otherwise)
    scale_format: str = "SCALAR"


E4M3 = FP8Format(torch.float8_e4m3fn, 448.0)     # OCP E4M3 at its full range (vLLM's FP8, block-FP8)


def set_scale(module: nn.Module, name: str, value, fmt: FP8Format) -> None:
    t = torch.as_tensor(value, dtype=torch.float32)
    if name in module._buffers:
        del module._buffers[name]
    elif hasattr(module, name):
        delattr(module, name)
    if fmt.scale_format == "CONST" or t.numel() > 1:
        module.register_buffer(name, t.clone())
    else:
        setattr(module, name, float(t.reshape(())))


def inverse(scale):
    return 1.0 / scale


def along_first_axis(scale, ndim: int):
    """A scale per index of a tensor's first axis (per-head attention scales: one per KV head),
    shaped to broadcast over an `ndim`-dimensional tensor; one scale as it is."""
    if torch.is_tensor(scale) and scale.numel() > 1:
        return scale.view(-1, *([1] * (ndim - 1)))
    return scale


def scalar_op_kernels(device: torch.device, scale):
    """The CPU kernels, where they run and the op's scale is one Python float; else None."""
    return None if torch.is_tensor(scale) else kernels_for(device)


def fp8_grid(x: torch.Tensor, inv_scale, fmt: FP8Format) -> torch.Tensor:
    """numerics.fake_quant, in one compiled pass on the CPU where the kernels run (same values)."""
    kernels = scalar_op_kernels(x.device, inv_scale)
    if kernels is None:
        return fake_quant(x, inv_scale, fmt.dtype, fmt.limit)
    return kernels.fake_quant(x, inv_scale, fmt.dtype, fmt.limit)


class FP8Matmul(Matmul):
    """Both inputs cast to FP8 with their scales; float32 accumulation, output in the input dtype."""

    def __init__(self, fmt: FP8Format, scale_a: float, scale_b: float):
        super().__init__()
        self.fmt = fmt
        set_scale(self, "scale_a", scale_a, fmt)
        set_scale(self, "scale_b", scale_b, fmt)

    def reads_own_grid(self, b_grid_scale) -> bool:
        """Whether b, FP8 values times `b_grid_scale`, is already on this matmul's own grid (the same
        power-of-two scale), so that rounding it again is the identity."""
        if b_grid_scale is None or any(torch.is_tensor(t) and t.numel() > 1 for t in (b_grid_scale, self.scale_b)):
            return False        # per-head scales: rounded again (exact scales: the identity anyway)
        return float(b_grid_scale) == float(self.scale_b) and math.frexp(float(self.scale_b))[0] == 0.5

    def forward(self, a: torch.Tensor, b: torch.Tensor, b_grid_scale=None) -> torch.Tensor:
        """`b_grid_scale`: b is known to be FP8 values times this scale (K/V read from an FP8 cache).
        If it is this matmul's own power-of-two scale, rounding b again is the identity: skipped
        (on SmolLM2 these are the largest tensors of a decode step)."""
        scale_a, scale_b = along_first_axis(self.scale_a, a.dim()), along_first_axis(self.scale_b, b.dim())
        aq = fp8_grid(a, inverse(scale_a), self.fmt)
        if self.reads_own_grid(b_grid_scale):
            bq = b.float() * inverse(scale_b)
        else:
            bq = fp8_grid(b, inverse(scale_b), self.fmt)
        return (torch.matmul(aq, bq) * (scale_a * scale_b)).to(a.dtype)


class FP8Softmax(Softmax):
    """Softmax whose output is cast to FP8 with its measured scale (and read back)."""

    def __init__(self, fmt: FP8Format, output_scale: float):
        super().__init__()
        self.fmt = fmt
        set_scale(self, "output_scale", output_scale, fmt)

    def forward(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        y = torch.softmax(x, dim=dim)
        return (fp8_grid(y, inverse(self.output_scale), self.fmt) * self.output_scale).to(x.dtype)


class FP8KVCache(KVCache):
    """Stores K or V as FP8 in the paged cache; reads back only the blocks a step uses."""

    def __init__(self, fmt: FP8Format, scale: float):
        super().__init__()
        self.fmt = fmt
        self.cache_dtype = fmt.dtype
        set_scale(self, "scale", scale, fmt)

    @property
    def grid_scale(self):
        return self.scale

    def load_tensor(self, name: str, full: torch.Tensor) -> None:
        if name != "scale" or full.numel() != 1:
            raise ValueError(f"expected one KV scale, got {name} of shape {tuple(full.shape)}")
        set_scale(self, "scale", full.float().reshape(()), self.fmt)

    def forward(self, x: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        kernels = scalar_op_kernels(cache.device, self.scale)
        if kernels is not None:
            kernels.write_cache(x, cache, slot_mapping, inverse(self.scale), self.fmt.limit)
            return x
        q = to_fp8(x.transpose(0, 1), inverse(along_first_axis(self.scale, 3)), self.fmt.dtype, self.fmt.limit).contiguous()
        flat = cache.view(cache.shape[0], -1, cache.shape[-1])
        # index_copy_ has no float8 kernel on the CPU; bytes are bytes.
        flat.view(torch.uint8).index_copy_(1, slot_mapping, q.view(torch.uint8))
        return x

    def fetch(self, cache: torch.Tensor, block_tables: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        kernels = scalar_op_kernels(cache.device, self.scale)
        if kernels is None:
            return (super().fetch(cache, block_tables, torch.float32) * along_first_axis(self.scale, 4)).to(dtype)
        # Only the blocks this step reads are gathered (as bytes) and dequantized.
        blocks = super().fetch(cache.view(torch.uint8), block_tables, torch.uint8).view(cache.dtype)
        return kernels.dequantize(blocks, self.scale).to(dtype)
