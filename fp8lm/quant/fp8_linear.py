"""FP8 weight formats of the one Linear (model/linear.py): an FP8 weight with a per-tensor or
per-channel scale, the input cast to FP8 with its static scale (or per token at run time when the
layer has no input scale), bias and output in high precision.

`quantize_linear` turns a Linear of the meta model into an FP8 one (its `weight` FP8, its
`weight_scale` / `input_scale` registered on the layer, where checkpoints fill them); once loaded,
`FP8Linear.prepare` picks the format that computes: native `_scaled_mm` on GPUs with FP8, the CPU
kernels' panels (1 byte per weight), else emulation over the dequantized (exact) FP8 values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fp8lm.fp8.cpu_kernels import CpuKernels, kernel_col_scale, kernels_for, pack_panels, unpack_panels
from fp8lm.fp8.formats import DeviceProfile
from fp8lm.fp8.matmul import native_fp8_available, scaled_mm
from fp8lm.fp8.numerics import fake_quant, to_fp8
from fp8lm.fp8.onednn_gemm import fp8_gemm_for
from fp8lm.fp8.scale_methods import ScaleSpec
from fp8lm.fp8.scales import dynamic_token_scales
from fp8lm.fp8.scales import weight_scale as compute_weight_scale
from fp8lm.model.linear import LinearFormat, ParallelLinear, copy_exact
from fp8lm.quant.fp8_modules import FP8Format, inverse, set_scale


def kernel_input_scales(s_in) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' row scale and activation inverse scale ([1] static, [M] per token)."""
    return (torch.as_tensor(s_in, dtype=torch.float32).reshape(-1),
            torch.as_tensor(inverse(s_in), dtype=torch.float32).reshape(-1))


class FP8Linear(LinearFormat):
    """The FP8 format as loaded: the layer's FP8 `weight` and its scales. It computes by reference
    emulation (dequantized per call); `prepare` returns the format to run with."""

    backend = "emulated"

    def __init__(self, fmt: FP8Format, weight_spec: ScaleSpec, dynamic_spec: ScaleSpec | None,
                 profile: DeviceProfile, rounded_weight: torch.Tensor | None = None):
        super().__init__()
        self.fmt, self.weight_spec, self.dynamic_spec, self.profile = fmt, weight_spec, dynamic_spec, profile
        self.rounded_weight = rounded_weight      # full FP8 weight rounded at calibration (GPTQ), used at load

    def _scheme(self) -> tuple:
        return self.fmt, self.weight_spec, self.dynamic_spec, self.profile

    # ---- loading ------------------------------------------------------------------------------
    def load(self, layer: ParallelLinear, name: str, full: torch.Tensor) -> None:
        """Checkpoint tensors: a high-precision weight (quantized here), or an FP8 weight with its
        weight_scale / input_scale (compressed-tensors checkpoints)."""
        if name in ("weight_scale", "input_scale"):
            value = full.float().reshape(-1, 1) if full.numel() > 1 else full.float().reshape(())
            if name == "weight_scale" and value.numel() > 1:
                value = layer.shard_output(value)
            set_scale(layer, name, value, self.fmt)
        elif name != "weight":
            raise ValueError(f"FP8 {type(layer).__name__} has no parameter {name!r}")
        elif full.dtype == self.fmt.dtype:
            copy_exact(layer.weight, layer.shard(full, layer.shard_dim), full.shape)
        else:
            self._quantize_weight(layer, full)

    def _quantize_weight(self, layer: ParallelLinear, full: torch.Tensor) -> None:
        """Quantizes a high-precision checkpoint tensor on the CPU; only FP8 bytes are kept."""
        if self.rounded_weight is not None:
            rounded, self.rounded_weight = self.rounded_weight, None
            if rounded.shape != full.shape:
                raise ValueError(f"rounded FP8 weight {tuple(rounded.shape)} does not fit checkpoint shape "
                                 f"{tuple(full.shape)}")
            copy_exact(layer.weight, layer.shard(rounded, layer.shard_dim), full.shape)
            return
        full = full.to("cpu", torch.float32)
        if layer.weight_scale is None:
            set_scale(layer, "weight_scale", compute_weight_scale(full, None, self.weight_spec, self.profile,
                                                                  self.fmt.dtype), self.fmt)
        scale = torch.as_tensor(layer.weight_scale, dtype=torch.float32)
        if scale.numel() > 1 and layer.shard_dim == 0 and scale.shape[0] == full.shape[0]:
            scale = layer.shard(scale, 0)
            set_scale(layer, "weight_scale", scale, self.fmt)
        copy_exact(layer.weight, to_fp8(layer.shard(full, layer.shard_dim), 1 / scale, self.fmt.dtype,
                                        self.fmt.limit), full.shape)

    def prepare(self, layer: ParallelLinear, device: torch.device, dtype: torch.dtype) -> FP8Linear:
        """Native FP8 where the GPU has it; on the CPU the compiled kernels over packed FP8 bytes;
        else emulation over a dequantized copy of the FP8 values."""
        if native_fp8_available(device) and layer.in_features % 16 == 0 and layer.out_features % 16 == 0:
            return FP8Native(*self._scheme())
        kernels = kernels_for(device)
        if kernels is not None:
            panels = FP8Panels(self._scheme(), kernels, fp8_gemm_for(kernels), pack_panels(layer.weight.detach()),
                               kernel_col_scale(layer.weight_scale, layer.out_features, self.fmt.dtype),
                               None if layer.input_scale is None else kernel_input_scales(layer.input_scale))
            layer.release_weight()
            return panels
        w = self._compute_weight(layer)
        onednn = device.type == "cpu" and torch.backends.mkldnn.is_available()
        return FP8Emulated(self._scheme(), torch.ops.mkldnn._reorder_linear_weight(w, 32) if onednn else w, onednn)

    # ---- computing ----------------------------------------------------------------------------
    def input_scale(self, layer: ParallelLinear, x: torch.Tensor):
        if layer.input_scale is None:
            return dynamic_token_scales(x, self.dynamic_spec, self.profile, self.fmt.dtype)
        return layer.input_scale

    def apply(self, layer, x, bias):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        s_in = self.input_scale(layer, x)
        y = self._matmul(layer, x, s_in).reshape(*shape[:-1], layer.out_features)
        return y if bias is None else y + bias

    def _matmul(self, layer: ParallelLinear, x: torch.Tensor, s_in) -> torch.Tensor:
        xq = fake_quant(x, inverse(s_in), self.fmt.dtype, self.fmt.limit)
        return (self._product(layer, xq) * s_in).to(x.dtype)

    def _product(self, layer: ParallelLinear, xq: torch.Tensor) -> torch.Tensor:
        """The FP8 values of x (float32) times the dequantized W."""
        return F.linear(xq, self._compute_weight(layer))

    def _compute_weight(self, layer: ParallelLinear) -> torch.Tensor:
        return layer.weight.float() * torch.as_tensor(layer.weight_scale, dtype=torch.float32, device=layer.weight.device)

    def fp8_weight(self, layer: ParallelLinear) -> torch.Tensor:
        """The [out, in] FP8 weight, also after packing (for checkpoints and reports)."""
        return layer.weight.detach()

    def dense_weight(self, layer):
        return self.fp8_weight(layer).float() * torch.as_tensor(layer.weight_scale, dtype=torch.float32)

    def describe(self) -> str:
        return f"{str(self.fmt.dtype).replace('torch.', '')} weight, backend={self.backend}"


class FP8Native(FP8Linear):
    """torch._scaled_mm on GPUs with FP8 tensor cores."""

    backend = "native"

    def _matmul(self, layer, x, s_in):
        x8 = to_fp8(x, inverse(s_in), self.fmt.dtype, self.fmt.limit)
        s_in_t = torch.as_tensor(s_in, dtype=torch.float32, device=x.device)
        s_w = torch.as_tensor(layer.weight_scale, dtype=torch.float32, device=x.device)
        return scaled_mm(x8, layer.weight, s_in_t, s_w, x.dtype)


class FP8Emulated(FP8Linear):
    """Emulation over a kept dequantized copy of W (oneDNN-packed on the CPU)."""

    def __init__(self, scheme: tuple, compute_weight: torch.Tensor, onednn: bool):
        super().__init__(*scheme)
        self.compute_weight, self.onednn = compute_weight, onednn
        self.backend = "emulated-onednn" if onednn else "emulated"

    def _product(self, layer, xq):
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(xq, self.compute_weight, None, "none", [], "")
        return F.linear(xq, self.compute_weight)


class FP8Panels(FP8Linear):
    """The CPU kernels over packed FP8 panels (the layer's `weight` is released): 1 byte per weight,
    the bias fused into the kernel. `gemm` multiplies (CpuKernels.linear's contract): the kernels, or
    oneDNN's matmul for many rows (fp8/onednn_gemm.py)."""

    def __init__(self, scheme: tuple, kernels: CpuKernels, gemm, packed: torch.Tensor, col_scale: torch.Tensor,
                 static_scales: tuple[torch.Tensor, torch.Tensor] | None):
        super().__init__(*scheme)
        self.kernels, self.gemm, self.packed = kernels, gemm, packed
        self.col_scale, self.static_scales = col_scale, static_scales
        self.backend = f"cpu-{kernels.isa}" if gemm is kernels else f"cpu-{kernels.isa}+onednn-{gemm.element_name}"

    def apply(self, layer, x, bias):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        row_scale, inv = self.static_scales or kernel_input_scales(self.input_scale(layer, x))
        y = self.gemm.linear(x, self.packed, layer.out_features, self.fmt.dtype, self.col_scale, row_scale, inv,
                             self.fmt.limit, None if bias is None else bias.float())
        return y.reshape(*shape[:-1], y.shape[-1])

    def fp8_weight(self, layer):
        return unpack_panels(self.packed, layer.out_features, self.fmt.dtype)


def is_fp8(layer) -> bool:
    """Whether `layer` is a Linear with an FP8 weight format."""
    return isinstance(layer, ParallelLinear) and isinstance(layer.format, FP8Linear)


def quantize_linear(layer: ParallelLinear, fmt: FP8Format, input_scale, weight_scale: torch.Tensor | None,
                    weight_spec: ScaleSpec, dynamic_spec: ScaleSpec | None, profile: DeviceProfile,
                    rounded_weight: torch.Tensor | None = None) -> None:
    """Makes a (not yet loaded) Linear FP8: its weight FP8, its scales registered on it (None: the
    weight scale comes from the checkpoint tensor at load time; no input scale: dynamic per token)."""
    layer.replace_weight(torch.empty(layer.weight.shape, dtype=fmt.dtype, device=layer.weight.device))
    for name, value in (("weight_scale", weight_scale), ("input_scale", input_scale)):
        if value is None:
            setattr(layer, name, None)
        else:
            set_scale(layer, name, value, fmt)
    layer.format = FP8Linear(fmt, weight_spec, dynamic_spec, profile, rounded_weight)
