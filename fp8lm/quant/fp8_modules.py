"""The FP8 modules the patcher swaps in for Linear, Matmul, Softmax and KVCache.

Scales follow the convention value ≈ fp8 * scale. With scale_format SCALAR they are Python
floats; with CONST (forced for per-channel and dynamic scales) registered buffers. Both give the
same outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fp8lm.fp8.cpu_kernels import kernel_col_scale, kernels_for, pack_panels, unpack_panels
from fp8lm.fp8.matmul import native_fp8_available, scaled_mm
from fp8lm.fp8.numerics import fake_quant, to_fp8
from fp8lm.fp8.scale_methods import ScaleSpec
from fp8lm.fp8.formats import DeviceProfile
from fp8lm.fp8.scales import dynamic_token_scales
from fp8lm.fp8.scales import weight_scale as compute_weight_scale
from fp8lm.model.layers import KVCache, Matmul, ParallelLinear, RowParallelLinear, Softmax, copy_exact


@dataclass(frozen=True)
class FP8Format:
    dtype: torch.dtype
    limit: float                 # the profile's full scale (240 for gaudi2 E4M3, 448 otherwise)
    scale_format: str = "SCALAR"


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


def kernel_input_scales(s_in) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' row scale and activation inverse scale ([1] static, [M] per token)."""
    return (torch.as_tensor(s_in, dtype=torch.float32).reshape(-1),
            torch.as_tensor(inverse(s_in), dtype=torch.float32).reshape(-1))


class FP8Linear(nn.Module):
    """FP8 weight with a per-tensor or per-channel scale; the input cast to FP8 with its static scale
    (or per token at run time when `input_scale` is None); bias and output in high precision."""

    def __init__(self, src: ParallelLinear, fmt: FP8Format, input_scale: float | None,
                 weight_scale: torch.Tensor | None, weight_spec: ScaleSpec, dynamic_spec: ScaleSpec | None,
                 profile: DeviceProfile):
        super().__init__()
        self.in_features, self.out_features = src.in_features, src.out_features
        self.tp_rank, self.tp_size, self.shard_dim = src.tp_rank, src.tp_size, src.shard_dim
        self.process_group = getattr(src, "process_group", None)
        self.is_row_parallel = isinstance(src, RowParallelLinear)
        self.fmt, self.weight_spec, self.dynamic_spec, self.profile = fmt, weight_spec, dynamic_spec, profile
        self.weight = nn.Parameter(torch.empty(src.weight.shape, dtype=fmt.dtype, device=src.weight.device),
                                   requires_grad=False)
        self.bias = src.bias
        if weight_scale is not None:
            set_scale(self, "weight_scale", weight_scale, fmt)
        else:
            self.weight_scale = None           # computed from the checkpoint tensor at load time
        if input_scale is not None:
            set_scale(self, "input_scale", input_scale, fmt)
        else:
            self.input_scale = None            # dynamic, per token
        self.backend = "emulated"
        self.compute_weight: torch.Tensor | None = None   # the emulation's dequantized copy
        self.packed_weight: torch.Tensor | None = None    # the CPU kernels' panels (replace `weight`)
        self.kernels = None
        self.static_kernel_scales: tuple[torch.Tensor, torch.Tensor] | None = None   # set by prepare
        self.rounded_weight: torch.Tensor | None = None   # full FP8 weight rounded at calibration (GPTQ)

    @property
    def dynamic(self) -> bool:
        return self.input_scale is None

    shard = ParallelLinear.shard   # the same slicing as the layer it replaces

    def load_tensor(self, name: str, full: torch.Tensor) -> None:
        """Checkpoint tensors: a high-precision weight (quantized here), or an FP8 weight with its
        weight_scale / input_scale (compressed-tensors checkpoints)."""
        if name in ("weight_scale", "input_scale"):
            value = full.float().reshape(-1, 1) if full.numel() > 1 else full.float().reshape(())
            if name == "weight_scale" and value.numel() > 1 and self.shard_dim == 0:
                value = self.shard(value, 0)
            set_scale(self, name, value, self.fmt)
        elif name == "bias":
            copy_exact(self.bias, self.shard(full, 0) if self.shard_dim == 0 else full, full.shape)
        elif name != "weight":
            raise ValueError(f"FP8Linear has no parameter {name!r}")
        elif full.dtype == self.fmt.dtype:
            self._load_fp8_weight(full)
        else:
            self._quantize_weight(full)

    def _quantize_weight(self, full: torch.Tensor) -> None:
        """Quantizes a high-precision checkpoint tensor on the CPU; only FP8 bytes are kept."""
        if self.rounded_weight is not None:
            rounded, self.rounded_weight = self.rounded_weight, None
            if rounded.shape != full.shape:
                raise ValueError(f"rounded FP8 weight {tuple(rounded.shape)} does not fit checkpoint shape "
                                 f"{tuple(full.shape)}")
            self._load_fp8_weight(rounded)
            return
        full = full.to("cpu", torch.float32)
        if self.weight_scale is None:
            set_scale(self, "weight_scale", compute_weight_scale(full, None, self.weight_spec, self.profile,
                                                                 self.fmt.dtype), self.fmt)
        scale = torch.as_tensor(self.weight_scale, dtype=torch.float32)
        if scale.numel() > 1 and self.shard_dim == 0 and scale.shape[0] == full.shape[0]:
            scale = self.shard(scale, 0)
            set_scale(self, "weight_scale", scale, self.fmt)
        shard = self.shard(full, self.shard_dim)
        copy_exact(self.weight, to_fp8(shard, 1 / scale, self.fmt.dtype, self.fmt.limit), full.shape)

    def _load_fp8_weight(self, full: torch.Tensor) -> None:
        """An FP8 checkpoint tensor, already quantized with this module's weight scale."""
        copy_exact(self.weight, self.shard(full, self.shard_dim), full.shape)

    def prepare(self, device: torch.device, compute_dtype: torch.dtype) -> None:
        """Chooses the backend once, after loading: native FP8 where the GPU has it; on the CPU the
        compiled kernels over packed FP8 bytes (1 byte per weight); else emulation over a
        dequantized copy of the (exact) FP8 weight values."""
        if self.packed_weight is not None or self.compute_weight is not None:
            return                                      # prepared already
        if native_fp8_available(device) and self.in_features % 16 == 0 and self.out_features % 16 == 0:
            self.backend = "native"
            return
        kernels = kernels_for(device)
        if kernels is not None:
            self.kernels = kernels
            self.packed_weight = pack_panels(self.weight.detach())
            self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=self.weight.dtype, device="meta"),
                                       requires_grad=False)
            self.kernel_col_scale = kernel_col_scale(self.weight_scale, self.out_features, self.fmt.dtype)
            self.static_kernel_scales = None if self.dynamic else kernel_input_scales(self.input_scale)
            self.backend = f"cpu-{kernels.isa}"
            return
        w = self.weight.float() * torch.as_tensor(self.weight_scale, dtype=torch.float32, device=self.weight.device)
        if device.type == "cpu" and torch.backends.mkldnn.is_available():
            self.compute_weight = torch.ops.mkldnn._reorder_linear_weight(w, 32)
            self.backend = "emulated-onednn"
        else:
            self.compute_weight = w
            self.backend = "emulated"

    def fp8_weight(self) -> torch.Tensor:
        """The [out, in] FP8 weight, also after packing (for checkpoints and reports)."""
        if self.packed_weight is not None:
            return unpack_panels(self.packed_weight, self.out_features, self.fmt.dtype)
        return self.weight.detach()

    def _input_scale(self, x: torch.Tensor):
        if self.input_scale is None:
            return dynamic_token_scales(x, self.dynamic_spec, self.profile, self.fmt.dtype)
        return self.input_scale

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x Wᵀ (+ bias, which only the CPU kernels fuse; the other paths add it here)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        s_in = self._input_scale(x)
        if self.packed_weight is not None:
            row_scale, inv = self.static_kernel_scales or kernel_input_scales(s_in)
            y = self.kernels.linear(x, self.packed_weight, self.out_features, self.fmt.dtype, self.kernel_col_scale,
                                    row_scale, inv, self.fmt.limit, None if bias is None else bias.float())
            return y.reshape(*shape[:-1], y.shape[-1])
        if self.backend == "native":
            x8 = to_fp8(x, inverse(s_in), self.fmt.dtype, self.fmt.limit)
            s_in_t = torch.as_tensor(s_in, dtype=torch.float32, device=x.device)
            s_w = torch.as_tensor(self.weight_scale, dtype=torch.float32, device=x.device)
            y = scaled_mm(x8, self.weight, s_in_t, s_w, x.dtype)
        else:
            xq = fake_quant(x, inverse(s_in), self.fmt.dtype, self.fmt.limit)
            if self.backend == "emulated-onednn":
                y = torch.ops.mkldnn._linear_pointwise(xq, self.compute_weight, None, "none", [], "")
            else:
                y = F.linear(xq, self.compute_weight)
            y = (y * s_in).to(x.dtype)
        y = y.reshape(*shape[:-1], y.shape[-1])
        return y if bias is None else y + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_row_parallel and self.tp_size > 1:
            y = self.matmul(x)
            torch.distributed.all_reduce(y, group=self.process_group)
            return y if self.bias is None else y + self.bias
        return self.matmul(x, self.bias)

    def extra_repr(self) -> str:
        gran = "per-channel" if torch.as_tensor(self.weight_scale if self.weight_scale is not None else 0).numel() > 1 \
            else "per-tensor"
        act = "dynamic per-token" if self.dynamic else "static"
        return (f"in={self.in_features}, out={self.out_features}, {str(self.fmt.dtype).replace('torch.', '')} "
                f"weight {gran}, {act} input, backend={self.backend}")


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
