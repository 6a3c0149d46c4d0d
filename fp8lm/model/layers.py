"""Building blocks of the Llama model besides the Linear (model/linear.py). Every tensor-product
and cache access is its own named module so that calibration can observe it and FP8 patching can
replace it (INC's Matmul, Softmax and KVCache types)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalize in float32 like transformers, scale in the compute dtype.
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * normed.to(x.dtype)


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by 1 + weight (weights stored centred on 0), in float32 before the
    cast back (Llama casts first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class Matmul(nn.Module):
    """A named batched matmul (q·kᵀ, p·v): the hook point for measuring and FP8-patching it.
    `b_grid_scale` tells an FP8 matmul that b came from an FP8 cache with that scale.
    `float32_sums` (set by the engine on CPUs without bfloat16 arithmetic, where torch's bfloat16
    matmul is ~5x slower than float32): bfloat16 operands multiply as float32 copies, rounded once."""

    float32_sums = False

    def forward(self, a: torch.Tensor, b: torch.Tensor, b_grid_scale=None) -> torch.Tensor:
        if self.float32_sums and a.dtype == torch.bfloat16:
            return torch.matmul(a.float(), b.float()).to(torch.bfloat16)
        return torch.matmul(a, b)


class Softmax(nn.Module):
    def forward(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return torch.softmax(x, dim=dim)


class KVCache(nn.Module):
    """Writes new K or V rows into a paged cache and reads a batch of sequences back.

    cache: [kv_heads, num_blocks, block_size, head_dim]; slot = block * block_size + offset.
    Heads come first so that gathering a batch's blocks yields [kv_heads, B, S, head_dim], the
    layout the attention matmuls consume, with a single copy.
    """

    cache_dtype: torch.dtype | None = None   # None: the model's compute dtype
    grid_scale = None                         # FP8 caches: what fetched values are FP8 multiples of

    def forward(self, x: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        # x: [T, kv_heads, head_dim]; returns x so that observers see what was written.
        flat = cache.view(cache.shape[0], -1, cache.shape[-1])
        flat.index_copy_(1, slot_mapping, x.transpose(0, 1).to(cache.dtype))
        return x

    def fetch(self, cache: torch.Tensor, block_tables: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # block_tables: [B, max_blocks] -> [kv_heads, B, max_blocks * block_size, head_dim]
        heads, _, block_size, dim = cache.shape
        b, n = block_tables.shape
        blocks = cache.index_select(1, block_tables.flatten())
        return blocks.view(heads, b, n * block_size, dim).to(dtype)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
