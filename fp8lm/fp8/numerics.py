"""FP8 casts: saturating, round-to-nearest-even, exact on every device.

`to_fp8` produces real float8 tensors (weights, KV cache). `round_to_fp8_grid` produces the same
values in float32 without a float8 round trip — the CPU emulation's fast path (exhaustively
equal to the float8 cast, see tests/test_fp8_numerics.py).
"""
from __future__ import annotations

from typing import Callable

import torch

# (mantissa bits, smallest normal exponent) of each float8 format
FP8_LAYOUT = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}
_EXPONENT_BITS = 0x7F800000


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def round_to_fp8_grid(y: torch.Tensor, dtype: torch.dtype, limit: float) -> torch.Tensor:
    """y (float32) saturated to ±limit and rounded half-to-even onto the FP8 grid of `dtype`."""
    mantissa, min_exp = FP8_LAYOUT[dtype]
    y = y.float().clamp(-limit, limit)
    # The spacing of FP8 values around y is 2^(floor(log2|y|) - mantissa), never below the
    # subnormal spacing; both are read straight from float32's exponent bits.
    bits = y.view(torch.int32) & _EXPONENT_BITS
    spacing = (bits - (mantissa << 23)).clamp(min=(127 + min_exp - mantissa) << 23).view(torch.float32)
    return torch.round(y / spacing) * spacing


def to_fp8(x: torch.Tensor, inv_scale: torch.Tensor | float, dtype: torch.dtype, limit: float) -> torch.Tensor:
    """float8 values of x / scale (x * inv_scale, as INC computes it), saturated at ±limit."""
    return (x.float() * inv_scale).clamp(-limit, limit).to(dtype)


def fake_quant(x: torch.Tensor, inv_scale: torch.Tensor | float, dtype: torch.dtype, limit: float) -> torch.Tensor:
    """The FP8 values of x / scale, as float32 (not multiplied back by the scale)."""
    return round_to_fp8_grid(x.float() * inv_scale, dtype, limit)


def dequantize(q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale).to(dtype)


def gram_from_upper_blocks(k: int, block: int, rows_from: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """A symmetric [k, k] matrix such as XᵀX from `rows_from(start, end)`: its rows start:end
    from column `start` on (the blocks on and above the diagonal, (1 + 1/blocks) / 2 of the whole
    product's work); the blocks below are their mirror."""
    out = None
    for start in range(0, k, block):
        end = min(start + block, k)
        rows = rows_from(start, end)
        if out is None:
            out = rows.new_empty(k, k)
        out[start:end, start:] = rows
        out[end:, start:end] = rows[:, end - start:].t()
    return out
