"""Observers keep one running maximum per tensor (or per channel): O(1) state, never per token."""
from __future__ import annotations

import numpy as np
import torch


class MaxAbsObserver:
    """Running max |x| over everything seen; stored as a (1, 1) array, as INC's files hold it."""

    def __init__(self, finite_only: bool = False):
        self.finite_only = finite_only   # softmax inputs carry -inf for masked keys
        self.value: torch.Tensor | None = None

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        # max(-min, max) is max |x| without an |x| copy: one pass over the tensor (the attention
        # scores and probabilities observed are the largest tensors of a prefill step).
        x = x.detach()
        if self.finite_only:
            x = x.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        low, high = torch.aminmax(x)
        return torch.maximum(-low, high).float()

    def update(self, x: torch.Tensor) -> None:
        m = self.reduce(x)
        self.value = m if self.value is None else torch.maximum(self.value, m)

    def result(self) -> np.ndarray:
        value = 0.0 if self.value is None else float(self.value)
        return np.array([[value]], dtype=np.float32)


class MaxAbsPerChannelObserver(MaxAbsObserver):
    """Running max |x| per channel of `channel_dim` (weights: output channels; activations: features)."""

    def __init__(self, channel_dim: int, finite_only: bool = False):
        super().__init__(finite_only)
        self.channel_dim = channel_dim

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().abs()
        if self.finite_only:
            a = torch.where(torch.isfinite(a), a, 0)
        a = a.movedim(self.channel_dim, 0)
        return a.reshape(a.shape[0], -1).amax(dim=1).float()

    def result(self) -> np.ndarray:
        if self.value is None:
            return np.zeros((0, 1), dtype=np.float32)
        return self.value.cpu().numpy().reshape(-1, 1).astype(np.float32)


def make_observer(kind: str, role: str, finite_only: bool = False) -> MaxAbsObserver:
    """role: 'weight' or 'activation'."""
    if kind == "maxabs":
        return MaxAbsObserver(finite_only)
    return MaxAbsPerChannelObserver(0 if role == "weight" else -1, finite_only)
