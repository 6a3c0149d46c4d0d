"""Building blocks of the Llama model. Every tensor-product and cache access is its own named
module so that calibration can observe it and FP8 patching can replace it (INC's Linear, Matmul,
Softmax and KVCache types).

Linear layers know how they are sharded across tensor-parallel ranks and load their own shard
(`weight_loader`), so the model code never deals with sharding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def copy_exact(param: nn.Parameter, src: torch.Tensor, full_shape) -> None:
    """copy_ without broadcasting: a checkpoint tensor of the wrong shape is an error."""
    if src.shape != param.shape:
        raise ValueError(f"checkpoint shape {tuple(full_shape)} does not fit parameter shape {tuple(param.shape)}")
    param.data.copy_(src)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class ParallelLinear(nn.Module):
    """y = x Wᵀ (+ b) on this rank's shard of W.

    `shard_dim` 0 splits output features (column parallel: each rank computes a slice of y);
    1 splits input features (row parallel: each rank computes a partial sum of y, which
    `reduce_output` all-reduces). `tp_size == 1` is the plain Linear.
    """

    shard_dim: int = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        full = (out_features, in_features)
        if full[self.shard_dim] % tp_size:
            raise ValueError(f"{type(self).__name__}: dimension {full[self.shard_dim]} does not split over "
                             f"{tp_size} tensor-parallel ranks")
        shape = list(full)
        shape[self.shard_dim] //= tp_size
        self.in_features, self.out_features = shape[1], shape[0]
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.weight.weight_loader = self.load_weight_shard
        self.bias = None
        if bias:
            bias_shape = shape[0] if self.shard_dim == 0 else full[0]
            self.bias = nn.Parameter(torch.empty(bias_shape), requires_grad=False)
            self.bias.weight_loader = self.load_bias_shard

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        size = full.shape[dim] // self.tp_size
        return full.narrow(dim, self.tp_rank * size, size)

    def load_weight_shard(self, param: nn.Parameter, full: torch.Tensor) -> None:
        copy_exact(param, self.shard(full, self.shard_dim), full.shape)

    def load_bias_shard(self, param: nn.Parameter, full: torch.Tensor) -> None:
        copy_exact(param, self.shard(full, 0) if self.shard_dim == 0 else full, full.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        tp = f", tp={self.tp_rank}/{self.tp_size}" if self.tp_size > 1 else ""
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}{tp}"


class ColumnParallelLinear(ParallelLinear):
    shard_dim = 0


class RowParallelLinear(ParallelLinear):
    """Its output is a partial sum on each rank; the model all-reduces it (see `reduce_output`)."""

    shard_dim = 1

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, after the reduction, not on every rank.
        y = F.linear(x, self.weight)
        y = self.reduce_output(y)
        return y if self.bias is None else y + self.bias

    def reduce_output(self, y: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            torch.distributed.all_reduce(y, group=self.process_group)
        return y


class Matmul(nn.Module):
    """A named batched matmul (q·kᵀ, p·v): the hook point for measuring and FP8-patching it."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class Softmax(nn.Module):
    def forward(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return torch.softmax(x, dim=dim)


class KVCache(nn.Module):
    """Writes new K or V rows into a paged cache and reads a batch of sequences back.

    cache: [num_blocks, block_size, kv_heads, head_dim]; slot = block * block_size + offset.
    """

    def forward(self, x: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        # x: [T, kv_heads, head_dim]; returns x so that observers see what was written.
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, x.to(cache.dtype))
        return x

    def fetch(self, cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int,
              dtype: torch.dtype) -> torch.Tensor:
        # block_tables: [B, max_blocks] -> [B, num_tokens, kv_heads, head_dim]
        blocks = cache[block_tables]
        b, n, bs = blocks.shape[:3]
        return blocks.view(b, n * bs, *blocks.shape[3:])[:, :num_tokens].to(dtype)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LMHead(ColumnParallelLinear):
    """Output projection to the vocabulary; with tensor parallelism each rank holds a slice of it."""
