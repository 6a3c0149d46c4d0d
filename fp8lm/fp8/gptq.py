"""Error-compensating rounding of a weight onto the FP8 grid (GPTQ's column-by-column update).

Round-to-nearest minimizes each weight's own error. What matters is the layer's output error
||X Wᵀ - X Ŵᵀ||² over the inputs X it sees, whose second moments H = XᵀX say which directions
of W the outputs are sensitive to. Columns are rounded one at a time (largest diag(H) first) and
each rounding error is spread onto the columns not yet rounded through the inverse of H, so that
later roundings compensate it. The result stays plain FP8 with the given scale(s): any loader runs it.
"""
from __future__ import annotations

import torch

from fp8lm.fp8.numerics import round_to_fp8_grid


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """trace((W - Ŵ) H (W - Ŵ)ᵀ) = ||X (W - Ŵ)ᵀ||² for H = XᵀX."""
    d = (weight.double() - approx.double())
    return float(((d @ hessian.double()) * d).sum())


def round_to_nearest(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, limit: float) -> torch.Tensor:
    """The FP8 values of weight / scale (float32, not multiplied back)."""
    return round_to_fp8_grid(weight.float() / scale, dtype, limit)


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               limit: float, block_size: int = 128, damping: float = 0.01) -> torch.Tensor:
    """FP8 values (float32, in units of `scale`: [1] per tensor or [out, 1] per channel) of `weight`
    [out, in] rounded to minimize the output error under `hessian` [in, in]."""
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1)
    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0                      # inputs never seen: their columns do not matter
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += damping * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    # Upper Cholesky factor of H⁻¹: row i holds how column i's error spreads onto columns > i.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q = torch.empty_like(w)
    cols = w.shape[1]
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block, errors = w[:, start:end].clone(), torch.empty(w.shape[0], end - start)
        ub = u[start:end, start:end]
        for i in range(end - start):
            column = block[:, i]
            rounded = round_to_fp8_grid(column[:, None] / scale, dtype, limit)[:, 0]
            q[:, start + i] = rounded
            err = (column - rounded * scale[:, 0]) / ub[i, i]
            block[:, i:] -= err[:, None] * ub[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return q[:, torch.argsort(order)]
