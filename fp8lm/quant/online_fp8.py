"""vLLM's `--quantization fp8` on an unquantized model: no QUANT_CONFIG, no calibration. Every Linear
but the LM head gets an FP8 weight whose per-tensor scale (its largest magnitude onto 448) is computed
as the checkpoint streams in, and FP8 inputs scaled per token at run time. With an FP8 KV cache
(`kv_cache_dtype` fp8 / fp8_e4m3) K and V are stored in FP8 with scale 1.0, as vLLM does when a
checkpoint carries no KV scales."""
from __future__ import annotations

import logging

import torch
from torch import nn

from fp8lm.fp8.formats import CPU
from fp8lm.fp8.scale_methods import ScaleSpec
from fp8lm.model.layers import KVCache
from fp8lm.model.linear import LMHead, ParallelLinear
from fp8lm.quant.fp8_linear import quantize_linear
from fp8lm.quant.fp8_modules import E4M3, FP8KVCache
from fp8lm.quant.modules import replace_module
from fp8lm.quant.post_load import PostLoad, finish_quantized_model

log = logging.getLogger(__name__)
PER_TENSOR = ScaleSpec()                                      # amax / 448, exact
PER_TOKEN = ScaleSpec(granularity="PCS", rounding="IDENTITY", dynamic=True)
KV_SCALE = 1.0


def unit_kv_cache() -> FP8KVCache:
    """An FP8 KV cache with scale 1.0: what vLLM runs where nothing calibrated the KV scales."""
    return FP8KVCache(E4M3, KV_SCALE)


class OnlineFP8:
    def __init__(self, device: torch.device, dtype: torch.dtype, kv_cache_fp8: bool):
        self.device, self.dtype, self.kv_cache_fp8 = device, dtype, kv_cache_fp8

    def patch(self, model: nn.Module) -> None:
        linears = caches = 0
        for name, module in list(model.named_modules()):
            if isinstance(module, ParallelLinear) and not isinstance(module, LMHead):
                quantize_linear(module, E4M3, None, None, PER_TENSOR, PER_TOKEN, CPU)
                linears += 1
            elif isinstance(module, KVCache) and self.kv_cache_fp8:
                replace_module(model, name, unit_kv_cache())
                caches += 1
        log.info("online FP8: %d Linears with per-tensor FP8 weights and per-token FP8 inputs%s", linears,
                 f"; FP8 KV cache with scale {KV_SCALE} (no calibrated KV scales, as vLLM)" if caches else "")

    def rename(self, name: str) -> str:
        return name

    def finish(self, model: nn.Module) -> None:
        finish_quantized_model(model, PostLoad(), self.device, self.dtype)
