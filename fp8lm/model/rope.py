"""Rotary position embeddings (HF "rotate_half" layout), with the llama3 and linear scalings."""
from __future__ import annotations

import math

import torch
from torch import nn



def rope_inverse_frequencies(dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    return inv_freq.float()


def _llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    original = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    in_band = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(in_band, blended, out)


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to q and k at given absolute positions."""

    def __init__(self, dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def build_cache(self, max_positions: int, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq = rope_inverse_frequencies(self.dim, self.theta, self.scaling).to(device)
        t = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        sin = freqs.sin()
        self.cos = torch.cat([freqs, freqs], dim=-1).cos().to(dtype)
        # rotate_half's sign folded into sin: [-sin, sin] (see apply_rotary)
        self.sin = torch.cat([-sin, sin], dim=-1).to(dtype)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for `positions` [T], shaped [T, 1, head_dim]; gathered once per step."""
        if self.cos is None:
            raise RuntimeError("RotaryEmbedding.build_cache() must run before the first forward")
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim] rotated by its positions' cos and [-sin, sin]: HF's
    x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = roll(x, half) * [-sin, sin] (the
    same products, the negation moved onto sin: bit for bit equal), in two fewer ops."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
