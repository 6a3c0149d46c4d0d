"""fp8lm's lm_head_bfloat16 (and checkpoints that carry it): a Linear kept out of FP8 computes with
its weight rounded to bfloat16 values, activations and sums in the model's dtype."""
from __future__ import annotations

import torch

from fp8lm.fp8.cpu_kernels import CpuKernels, pack_panels, unpack_panels
from fp8lm.model.layers import Matmul
from fp8lm.model.linear import LinearFormat, ParallelLinear, dense_cpu_linears


class BF16Panels(LinearFormat):
    """W as the CPU kernels' bfloat16 panels: half the bytes a float32 W reads per step; float32 sums."""

    def __init__(self, kernels: CpuKernels, panels: torch.Tensor):
        super().__init__(bfloat16_values=True)
        self.kernels, self.panels = kernels, panels

    def _sums(self, layer: ParallelLinear, x: torch.Tensor) -> torch.Tensor:
        y = self.kernels.linear_bf16(x.reshape(-1, layer.in_features).float(), self.panels, layer.out_features)
        return y.view(*x.shape[:-1], layer.out_features)

    def apply(self, layer, x, bias):
        y = self._sums(layer, x).to(x.dtype)
        return y if bias is None else y + bias

    def float32_logits(self, layer, x, bias):
        y = self._sums(layer, x)
        return y if bias is None else y + bias.float()

    def dense_weight(self, layer):
        return unpack_panels(self.panels, layer.out_features, torch.bfloat16).to(layer.weight.dtype)

    def describe(self) -> str:
        return "bfloat16 panels"


def keep_bfloat16_values(layer: ParallelLinear, kernels: CpuKernels | None) -> None:
    """Rounds the layer's W to bfloat16 values. With the CPU kernels W is kept as their bfloat16
    panels; elsewhere W holds the rounded values in its own dtype (the same numbers). A tied
    embedding keeps its own values."""
    rounded = layer.dense_weight().to(torch.bfloat16)
    if kernels is None:
        layer.replace_weight(rounded.to(layer.weight.dtype))
        layer.format = LinearFormat(bfloat16_values=True)
        return
    layer.format = BF16Panels(kernels, pack_panels(rounded))
    layer.release_weight()


def bfloat16_in_float32_sums(model: torch.nn.Module, kernels: CpuKernels) -> int:
    """For CPUs where oneDNN cannot pack bfloat16 (no AVX-512), whose torch bfloat16 matmul runs at
    ~1/5 of float32 (16-20 GFLOP/s on an AVX2 EPYC): the dense bfloat16 Linears get the kernels'
    bfloat16 panels and the attention matmuls multiply float32 copies, each rounded to bfloat16 once:
    the same float32 sums of the same products as torch's matmul, up to the sums' order. Returns how
    many Linears."""
    for m in model.modules():
        if type(m) is Matmul:
            m.float32_sums = True
    linears = dense_cpu_linears(model, {torch.bfloat16})
    for m in linears:
        m.format = BF16Panels(kernels, pack_panels(m.weight.detach()))
        m.release_weight()
    return len(linears)
