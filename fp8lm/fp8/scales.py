"""Scales from measured maxima, per ScaleSpec and device profile:

    scale = maxabs / (fullscale * backoff), then rounded (pow2: 2^ceil(log2 s); hw-aligned: onto
    the profile's scale set), so that x / scale fits the FP8 range. value ≈ fp8 * scale.
"""
from __future__ import annotations

import math

import torch

from fp8lm.fp8.formats import DeviceProfile
from fp8lm.fp8.numerics import fake_quant
from fp8lm.fp8.scale_methods import ScaleSpec

_TINY = 2.0 ** -100   # floor for an all-zero tensor: any scale represents it exactly


def round_pow2(s: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(s)))


def round_hw_aligned(s: torch.Tensor, profile: DeviceProfile) -> torch.Tensor:
    """pow2, then up to the next scale the device can apply, clamped into its range."""
    p = round_pow2(s)
    if not profile.is_pow2_set:
        return p
    exps = sorted(profile.exponents)
    step = exps[1] - exps[0]
    e = torch.ceil(torch.log2(p) / step) * step
    return torch.exp2(e.clamp(exps[0], exps[-1]))


def apply_rounding(s: torch.Tensor, rounding: str, profile: DeviceProfile) -> torch.Tensor:
    if rounding == "POW2":
        return round_pow2(s)
    if rounding == "HW_ALIGNED":
        return round_hw_aligned(s, profile)
    return s


def maxabs_scale(maxabs: torch.Tensor, spec: ScaleSpec, profile: DeviceProfile, fp8_dtype: torch.dtype) -> torch.Tensor:
    s = maxabs.double().clamp(min=_TINY) / (profile.fullscale(fp8_dtype) * spec.backoff)
    return apply_rounding(s, spec.rounding, profile).float()


def fixed_scale(spec: ScaleSpec, profile: DeviceProfile) -> float:
    if spec.rounding == "HW_ALIGNED_FIXED":
        return profile.single_scale
    return 1.0   # SCALE_UNIT, DUMMY_SCALES


def opt_weight_scale(weight: torch.Tensor, spec: ScaleSpec, profile: DeviceProfile, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Per tensor: the candidate scale with the least squared quantization error of W.
    Per channel: each row's best of reference * candidates (reference = its maxabs pow2 scale)."""
    w = weight.float()
    limit = profile.fullscale(fp8_dtype)
    if spec.granularity == "PCS":
        ref = maxabs_scale(w.abs().amax(dim=1, keepdim=True), ScaleSpec(backoff=spec.backoff, rounding="POW2"),
                           profile, fp8_dtype)
        factors = spec.candidates or tuple(2.0 ** e for e in range(-3, 5))
        best_err, best = None, None
        for f in factors:
            s = ref * f
            err = ((fake_quant(w, 1 / s, fp8_dtype, limit) * s - w) ** 2).sum(dim=1, keepdim=True)
            best = s if best is None else torch.where(err < best_err, s, best)
            best_err = err if best_err is None else torch.minimum(err, best_err)
        return best
    candidates = spec.candidates or _profile_candidates(profile)
    errors = [float(((fake_quant(w, 1 / c, fp8_dtype, limit) * c - w) ** 2).sum()) for c in candidates]
    return torch.tensor(candidates[min(range(len(errors)), key=errors.__getitem__)])


def _profile_candidates(profile: DeviceProfile) -> tuple[float, ...]:
    if profile.is_pow2_set:
        return tuple(2.0 ** e for e in profile.exponents)
    return tuple(2.0 ** e for e in range(-10, 10))


def weight_scale(weight: torch.Tensor | None, maxabs: torch.Tensor | None, spec: ScaleSpec,
                 profile: DeviceProfile, fp8_dtype: torch.dtype) -> torch.Tensor:
    """[1] per tensor or [out, 1] per channel. `maxabs` is the measured one ([1,1] or [out,1])."""
    if spec.value_type in ("FIXED_VALUE", "DUMMY_SCALES"):
        return torch.tensor([fixed_scale(spec, profile)])
    if spec.value_type == "OPT":
        if weight is None:
            raise ValueError("an OPT weight scale needs the weight itself")
        s = opt_weight_scale(weight, spec, profile, fp8_dtype)
        return s.reshape(-1, 1) if spec.granularity == "PCS" else s.reshape(1)
    if maxabs is None:
        if weight is None:
            raise ValueError("a weight scale needs the measured maximum or the weight")
        w = weight.float().abs()
        maxabs = w.amax(dim=1, keepdim=True) if spec.granularity == "PCS" else w.amax().reshape(1)
    maxabs = torch.as_tensor(maxabs, dtype=torch.float32)
    if spec.granularity == "PCS":
        return maxabs_scale(maxabs.reshape(-1, 1), spec, profile, fp8_dtype)
    return maxabs_scale(maxabs.reshape(-1).amax().reshape(1), spec, profile, fp8_dtype)


def activation_scale(maxabs, spec: ScaleSpec, profile: DeviceProfile, fp8_dtype: torch.dtype) -> float:
    """One per-tensor scale (static activations)."""
    if spec.value_type in ("FIXED_VALUE", "DUMMY_SCALES"):
        return fixed_scale(spec, profile)
    m = torch.as_tensor(maxabs, dtype=torch.float32).reshape(-1).amax().reshape(1)
    return float(maxabs_scale(m, spec, profile, fp8_dtype))


def dynamic_token_scales(x: torch.Tensor, spec: ScaleSpec, profile: DeviceProfile, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Per-token scales [T, 1] computed at run time (dynamic activation quantization)."""
    m = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY)
    s = m / profile.fullscale(fp8_dtype)
    return apply_rounding(s, spec.rounding, profile)


def is_pow2(value: float) -> bool:
    return value > 0 and math.frexp(value)[0] == 0.5
