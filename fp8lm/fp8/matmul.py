"""The FP8 matmul: native `torch._scaled_mm` on CUDA devices of compute capability >= 8.9, exact
emulation elsewhere (the same FP8 values, accumulated in float32)."""
from __future__ import annotations

import torch


def native_fp8_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


def scaled_mm(x_fp8: torch.Tensor, w_fp8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """x_fp8 [M, K] @ w_fp8[N, K]ᵀ with x_scale [1] or [M, 1] and w_scale [1] or [N, 1] (native path)."""
    if x_scale.numel() > 1 or w_scale.numel() > 1:
        # Row-wise scaling needs both scales as vectors: [M, 1] and [1, N].
        x_scale = x_scale.reshape(-1, 1).expand(x_fp8.shape[0], 1).contiguous()
        w_scale = w_scale.reshape(1, -1).expand(1, w_fp8.shape[0]).contiguous()
    else:
        x_scale, w_scale = x_scale.reshape(()), w_scale.reshape(())
    return torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale.float(), scale_b=w_scale.float(), out_dtype=out_dtype)
