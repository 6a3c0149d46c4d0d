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
    """trace((W - Ŵ) H (W - Ŵ)ᵀ) = ||X (W - Ŵ)ᵀ||² for H = XᵀX. The product in float32 (its relative
    error, ~1e-6, is far below the differences it ranks), the sum in float64."""
    d = weight.float() - approx.float()
    return float(((d @ hessian.float()) * d).sum(dtype=torch.float64))


def upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """U upper triangular with H⁻¹ = UᵀU (row i: how column i's rounding error spreads onto columns
    > i). With J the reversal, J H J = L Lᵀ gives H = R Rᵀ for R = J L J (upper), so U = R⁻¹ = J L⁻¹ J:
    one Cholesky factorization and one triangular inverse."""
    lower = torch.linalg.cholesky(h.flip(-2, -1))
    eye = torch.eye(h.shape[-1], dtype=h.dtype).expand_as(h)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(-2, -1)


def round_to_nearest(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, limit: float) -> torch.Tensor:
    """The FP8 values of weight / scale (float32, not multiplied back)."""
    return round_to_fp8_grid(weight.float() / scale, dtype, limit)


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               limit: float, block_size: int = 128, damping: float = 0.01) -> torch.Tensor:
    """FP8 values (float32, in units of `scale`: [1] per tensor or [out, 1] per channel) of `weight`
    [out, in] rounded to minimize the output error under `hessian` [in, in]. A batch of problems of
    one shape runs as one: weight [P, out, in], hessian [P, in, in], scale [P, out, 1] (or [P, 1, 1]);
    each is rounded as alone (rows and problems never mix), and the column loop's per-step overhead
    is paid once for all of them."""
    batched = weight.dim() == 3
    w = (weight if batched else weight[None]).detach().float()
    h = (hessian if batched else hessian[None]).detach().double().clone()
    p, rows, cols = w.shape
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(p if batched else 1, -1, 1)[..., 0]   # [P, out|1]
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag[diag == 0] = 1.0                          # inputs never seen: their columns do not matter
    order = torch.argsort(diag, dim=-1, descending=True)                                  # [P, in]
    h = torch.stack([hp[o][:, o] for hp, o in zip(h, order)])
    h += damping * h.diagonal(dim1=-2, dim2=-1).mean(dim=-1)[:, None, None] * torch.eye(cols, dtype=h.dtype)
    u = upper_cholesky_of_inverse(h).float()
    # Columns as rows ([P, in, out], largest diag(H) first): each step reads and writes one contiguous row.
    wt = torch.stack([wp.index_select(0, o) for wp, o in zip(w.transpose(1, 2).contiguous(), order)])
    qt = torch.empty(p, cols, rows)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block, errors = wt[:, start:end], torch.empty(p, end - start, rows)
        ub = u[:, start:end, start:end]
        for i in range(end - start):
            column = block[:, i]
            rounded = round_to_fp8_grid(column / scale, dtype, limit)
            qt[:, start + i] = rounded
            err = (column - rounded * scale) / ub[:, i, i, None]
            block[:, i:].addcmul_(ub[:, i, i:, None], err[:, None, :], value=-1)
            errors[:, i] = err
        wt[:, end:] -= u[:, start:end, end:].transpose(1, 2) @ errors
    q = torch.stack([qp.index_select(0, torch.argsort(o)) for qp, o in zip(qt, order)]).transpose(1, 2)
    return q if batched else q[0]
