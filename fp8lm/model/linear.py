"""The model's one Linear: `ParallelLinear` owns tensor-parallel sharding, the bias and the
all-reduce; how this rank's weight is stored and multiplied is its `format` (a `LinearFormat`).

Quantization replaces a Linear's math, not the Linear: a quantizer hands a layer another format
(FP8 panels, native FP8, bfloat16 panels, ...; see quant/) and the layer's name, type, hooks and
parallel logic stay. The layer keeps the tensors a checkpoint fills (`weight`, and the scales a
format registers) as its own parameters and buffers, so loading and reporting see one module.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def copy_exact(param: nn.Parameter, src: torch.Tensor, full_shape) -> None:
    """copy_ without broadcasting: a checkpoint tensor of the wrong shape is an error."""
    if src.shape != param.shape:
        raise ValueError(f"checkpoint shape {tuple(full_shape)} does not fit parameter shape {tuple(param.shape)}")
    param.data.copy_(src)


class LinearFormat:
    """How a ParallelLinear holds this rank's weight and computes x Wᵀ. The base is the dense
    weight in the model's dtype (the layer's own `weight` parameter); one instance may serve many
    layers unless a subclass keeps per-layer tensors."""

    def __init__(self, bfloat16_values: bool = False):
        self.bfloat16_values = bfloat16_values   # W holds bfloat16 values: a checkpoint stores it as bfloat16

    def load(self, layer: ParallelLinear, name: str, full: torch.Tensor) -> None:
        """Loads checkpoint tensor `name` (the full, unsharded tensor) into `layer`; the bias is
        the layer's own."""
        if name != "weight":
            raise ValueError(f"{type(layer).__name__} has no parameter {name!r}")
        copy_exact(layer.weight, layer.shard(full, layer.shard_dim), full.shape)

    def prepare(self, layer: ParallelLinear, device: torch.device, dtype: torch.dtype) -> LinearFormat:
        """The format to compute with once every tensor is loaded (itself, or a faster form)."""
        return self

    def apply(self, layer: ParallelLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x Wᵀ (+ bias) in x's dtype."""
        y = F.linear(x, layer.weight)
        return y if bias is None else y + bias

    def float32_logits(self, layer: ParallelLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """x Wᵀ (+ bias) as float32 sums never rounded to x's dtype, where this format has them; else None."""
        return None

    def dense_weight(self, layer: ParallelLinear) -> torch.Tensor:
        """W as a plain [out, in] tensor in the model's dtype (checkpoints, reports)."""
        return layer.weight.detach()

    def describe(self) -> str:
        return ""


DENSE = LinearFormat()


class OneDNNPacked(LinearFormat):
    """W as a oneDNN-packed copy (2-3x faster than torch's CPU mm on these machines)."""

    def __init__(self, packed: torch.Tensor, bfloat16_values: bool = False):
        super().__init__(bfloat16_values)
        self.packed = packed

    def apply(self, layer, x, bias):
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return y if bias is None else y + bias

    def dense_weight(self, layer):
        return self.packed.to_dense()

    def describe(self) -> str:
        return "onednn-packed"


class FusedProjections:
    """What a quantizer may set on the first of several Linears that read one input (a module's
    `fusable_projections`): the same outputs from one call. Declared here, built in quant/."""

    def applies(self, linears) -> bool:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class ParallelLinear(nn.Module):
    """y = x Wᵀ (+ b) on this rank's shard of W.

    `shard_dim` 0 splits output features (column parallel: each rank computes a slice of y);
    1 splits input features (row parallel: each rank computes a partial sum of y, which
    `reduce_output` all-reduces). `tp_size == 1` is the plain Linear.
    """

    shard_dim: int = 0
    fused: FusedProjections | None = None   # set on the first of a fused group (see `project`)

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1, process_group=None):
        super().__init__()
        full = (out_features, in_features)
        if full[self.shard_dim] % tp_size:
            raise ValueError(f"{type(self).__name__}: dimension {full[self.shard_dim]} does not split over "
                             f"{tp_size} tensor-parallel ranks")
        shape = list(full)
        shape[self.shard_dim] //= tp_size
        self.in_features, self.out_features = shape[1], shape[0]
        self.tp_rank, self.tp_size, self.process_group = tp_rank, tp_size, process_group
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.format: LinearFormat = DENSE
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.shard_output_shape(out_features)), requires_grad=False)

    @property
    def reduces_output(self) -> bool:
        """Whether this rank's y is a partial sum that the ranks all-reduce."""
        return self.shard_dim == 1 and self.tp_size > 1

    def shard_output_shape(self, full_out: int) -> int:
        return full_out // self.tp_size if self.shard_dim == 0 else full_out

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of `full` along `dim` (the whole tensor without parallelism)."""
        size = full.shape[dim] // self.tp_size
        return full.narrow(dim, self.tp_rank * size, size)

    def shard_output(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a tensor with one entry per output feature (bias, per-channel scales)."""
        return self.shard(full, 0) if self.shard_dim == 0 else full

    def replace_weight(self, weight: torch.Tensor) -> None:
        """W becomes `weight` (another dtype or device: meta while a format holds its own copy)."""
        self.weight = nn.Parameter(weight, requires_grad=False)

    def release_weight(self) -> None:
        """W becomes a meta placeholder of its shape and dtype once a format computes from its own
        copy (unless another module shares the tensor: tied embeddings keep theirs)."""
        self.replace_weight(torch.empty(self.weight.shape, dtype=self.weight.dtype, device="meta"))

    def load_tensor(self, name: str, full: torch.Tensor) -> None:
        """Loads this rank's shard of the full checkpoint tensor for parameter `name`."""
        if name == "bias":
            copy_exact(self.bias, self.shard_output(full), full.shape)
        else:
            self.format.load(self, name, full)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ without the bias (this rank's partial sum where the output is reduced)."""
        return self.format.apply(self, x, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduces_output:
            # The bias is added once, after the reduction, not on every rank.
            y = self.reduce_output(self.format.apply(self, x, None))
            return y if self.bias is None else y + self.bias
        return self.format.apply(self, x, self.bias)

    def reduce_output(self, y: torch.Tensor) -> torch.Tensor:
        if self.reduces_output:
            torch.distributed.all_reduce(y, group=self.process_group)
        return y

    def dense_weight(self) -> torch.Tensor:
        return self.format.dense_weight(self)

    def extra_repr(self) -> str:
        tp = f", tp={self.tp_rank}/{self.tp_size}" if self.tp_size > 1 else ""
        described = self.format.describe()
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}{tp}" + (
            f", {described}" if described else "")


class ColumnParallelLinear(ParallelLinear):
    shard_dim = 0


class RowParallelLinear(ParallelLinear):
    """Its output is a partial sum on each rank, all-reduced before the bias is added."""

    shard_dim = 1


class LMHead(ColumnParallelLinear):
    """Output projection to the vocabulary; with tensor parallelism each rank holds a slice of it."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits. Formats that sum in float32 give those sums themselves: a bfloat16
        model's logits are not rounded to bfloat16 (steps of 1/16-1/8 nat at their size, which make
        greedy ties that the token id breaks)."""
        # Hooks (measurement) see the module's own call.
        hooked = self._forward_hooks or self._forward_pre_hooks
        y = None if hooked else self.format.float32_logits(self, hidden, self.bias)
        return self(hidden).float() if y is None else y


def project(x: torch.Tensor, *linears: ParallelLinear) -> tuple[torch.Tensor, ...]:
    """Each of `linears` applied to x: in one call where a quantizer fused them, else one by one."""
    fused = linears[0].fused
    if fused is not None and fused.applies(linears):
        return fused(x)
    return tuple(m(x) for m in linears)


@functools.cache
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


def bfloat16_matmul_is_slow() -> bool:
    """Whether this CPU lacks bfloat16 arithmetic (oneDNN cannot pack bfloat16: no AVX-512). torch's
    bfloat16 matmul then runs at ~1/5 of float32 (16-20 GFLOP/s on an AVX2 EPYC), so bfloat16 matmuls
    run on float32 copies and round once: the same float32 sums of the same products, up to order."""
    return not onednn_packs(torch.bfloat16)


def dense_cpu_linears(model: nn.Module, dtypes: set[torch.dtype]) -> list[ParallelLinear]:
    """The Linears of `model` with a plain high-precision weight of one of `dtypes` on the CPU."""
    return [m for m in model.modules() if isinstance(m, ParallelLinear) and type(m.format) is LinearFormat
            and m.weight.device.type == "cpu" and m.weight.dtype in dtypes]


def pack_linears_for_cpu(model: nn.Module, batch_hint: int = 32) -> int:
    """Gives every dense high-precision linear of a CPU model a oneDNN-packed format; returns how many."""
    linears = dense_cpu_linears(model, {d for d in (torch.float32, torch.bfloat16) if onednn_packs(d)})
    for m in linears:
        packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_hint)
        m.format = OneDNNPacked(packed, m.format.bfloat16_values)
        m.release_weight()
    return len(linears)
