"""Building blocks of the Llama model. Every tensor-product and cache access is its own named
module so that calibration can observe it and FP8 patching can replace it (INC's Linear, Matmul,
Softmax and KVCache types).

Linear layers know how they are sharded across tensor-parallel ranks and load their own shard
(`load_tensor`), so the model code never deals with sharding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fp8lm.fp8.cpu_kernels import pack_panels, unpack_panels


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
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalize in float32 like transformers, scale in the compute dtype.
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * normed.to(x.dtype)


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
        self.packed_weight: torch.Tensor | None = None  # see pack_for_onednn
        self.bf16_panels: tuple | None = None           # (CpuKernels, panels), see keep_bfloat16_values
        self.bfloat16_values = False                    # W was rounded to bfloat16 (keep_bfloat16_values)
        self.bias = None
        if bias:
            bias_shape = shape[0] if self.shard_dim == 0 else full[0]
            self.bias = nn.Parameter(torch.empty(bias_shape), requires_grad=False)

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of `full` along `dim` (the whole tensor without parallelism)."""
        size = full.shape[dim] // self.tp_size
        return full.narrow(dim, self.tp_rank * size, size)

    def load_tensor(self, name: str, full: torch.Tensor) -> None:
        """Loads this rank's shard of the full checkpoint tensor for parameter `name`."""
        if name == "weight":
            copy_exact(self.weight, self.shard(full, self.shard_dim), full.shape)
        elif name == "bias":
            copy_exact(self.bias, self.shard(full, 0) if self.shard_dim == 0 else full, full.shape)
        else:
            raise ValueError(f"{type(self).__name__} has no parameter {name!r}")

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ without the bias."""
        if self.bf16_panels is not None:
            return self._panels_matmul(x).to(x.dtype)
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, None, "none", [], "")
        return F.linear(x, self.weight)

    def _panels_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ on the bfloat16 panels: float32 sums, float32 result."""
        kernels, panels = self.bf16_panels
        y = kernels.linear_bf16(x.reshape(-1, self.in_features).float(), panels, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """W as a plain tensor, also after packing (for checkpoints and reports)."""
        if self.bf16_panels is not None:
            return unpack_panels(self.bf16_panels[1], self.out_features, torch.bfloat16).to(self.weight.dtype)
        return self.packed_weight.to_dense() if self.packed_weight is not None else self.weight.detach()

    def keep_bfloat16_values(self, kernels=None) -> None:
        """Rounds W to bfloat16 values; activations and sums stay in the model's dtype. With the CPU
        kernels (`CpuKernels`) W is kept as their bfloat16 panels: half the bytes a float32 W reads per
        step. Elsewhere W holds the rounded values in its own dtype (the same numbers). A tied
        embedding keeps its own values."""
        rounded = self.dense_weight().to(torch.bfloat16)
        self.bfloat16_values = True
        if kernels is None:
            self.packed_weight = None
            self.weight = nn.Parameter(rounded.to(self.weight.dtype), requires_grad=False)
            return
        self.bf16_panels = (kernels, pack_panels(rounded))
        self.packed_weight = None
        self._release_weight()

    def pack_for_onednn(self, batch_hint: int) -> None:
        """Replaces W by a oneDNN-packed copy (2-3x faster than torch's CPU mm on these machines).
        The plain weight is released unless another module shares it (tied embeddings)."""
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_hint)
        self._release_weight()

    def _release_weight(self) -> None:
        """W becomes a meta placeholder of its shape and dtype once another copy computes with it."""
        self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=self.weight.dtype, device="meta"),
                                   requires_grad=False)

    def extra_repr(self) -> str:
        tp = f", tp={self.tp_rank}/{self.tp_size}" if self.tp_size > 1 else ""
        packed = (", onednn-packed" if self.packed_weight is not None else
                  ", bfloat16 panels" if self.bf16_panels is not None else "")
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}{tp}{packed}"


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
        y = self.reduce_output(self.matmul(x))
        return y if self.bias is None else y + self.bias

    def reduce_output(self, y: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            torch.distributed.all_reduce(y, group=self.process_group)
        return y


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each of `linears` applied to x: in one matmul where a quantizer fused them (it sets `fused`
    on the first one, a callable that returns the same outputs), else one by one."""
    fused = getattr(linears[0], "fused", None)
    if fused is not None and fused.applies(linears):
        return fused(x)
    return tuple(m(x) for m in linears)


class Matmul(nn.Module):
    """A named batched matmul (q·kᵀ, p·v): the hook point for measuring and FP8-patching it.
    `b_grid_scale` tells an FP8 matmul that b came from an FP8 cache with that scale."""

    def forward(self, a: torch.Tensor, b: torch.Tensor, b_grid_scale=None) -> torch.Tensor:
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


class LMHead(ColumnParallelLinear):
    """Output projection to the vocabulary; with tensor parallelism each rank holds a slice of it."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits. On bfloat16 panels they are the float32 sums themselves: a bfloat16 model's
        logits are not rounded to bfloat16 (steps of 1/16-1/8 nat at their size, which make greedy
        ties that the token id breaks)."""
        if self.bf16_panels is None:
            return self(hidden).float()
        y = self._panels_matmul(hidden)
        return y if self.bias is None else y + self.bias.float()


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack weights of `dtype` on this CPU (bfloat16 needs AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT; on AVX2-only CPUs torch refuses, and the plain weight is used)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
    except RuntimeError:
        return False
    return True


def pack_linears_for_cpu(model: nn.Module, batch_hint: int = 32) -> int:
    """Packs every high-precision linear of a CPU model for oneDNN; returns how many."""
    packable = {d for d in (torch.float32, torch.bfloat16) if onednn_packs(d)}
    linears = [m for m in model.modules() if type(m) in (ColumnParallelLinear, RowParallelLinear, LMHead)
               and m.weight.device.type == "cpu" and m.weight.dtype in packable]
    for m in linears:
        m.pack_for_onednn(batch_hint)
    return len(linears)
