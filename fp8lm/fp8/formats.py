"""FP8 formats and the device profiles that decide which scales a device can use."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8lm.errors import FP8LMError

FP8_DTYPES = {"E4M3": torch.float8_e4m3fn, "E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class DeviceProfile:
    """How a device represents FP8: the largest E4M3 value it uses and the scales it can apply.

    `exponents` lists the allowed scales as powers of two (None: any float32 scale);
    `single_scale` is what hw_aligned_single_scale fixes every scale to.
    """
    name: str
    e4m3_max: float
    exponents: tuple[int, ...] | None
    single_scale: float

    def fullscale(self, fp8_dtype: torch.dtype) -> float:
        return self.e4m3_max if fp8_dtype == torch.float8_e4m3fn else torch.finfo(fp8_dtype).max

    @property
    def is_pow2_set(self) -> bool:
        return self.exponents is not None


# Gaudi2's E4M3 tops out at 240 and applies scales through 4 exponent biases: 16, 1, 1/16, 1/256.
GAUDI2 = DeviceProfile("gaudi2", 240.0, (4, 0, -4, -8), 16.0)
# Gaudi3 uses OCP E4M3 (448) and any power of two from 2^7 down to 2^-55.
GAUDI3 = DeviceProfile("gaudi3", 448.0, tuple(range(7, -56, -1)), 128.0)
# CPUs and CUDA scale in float32: any value. hw_aligned_single_scale then means scale 1.
CUDA = DeviceProfile("cuda", 448.0, None, 1.0)
CPU = DeviceProfile("cpu", 448.0, None, 1.0)
PROFILES = {p.name: p for p in (GAUDI2, GAUDI3, CUDA, CPU)}


def profile_for(device: torch.device, override: str | None = None) -> DeviceProfile:
    """The profile of `device`, unless `device_for_scales` names one (GAUDI2, GAUDI3, CUDA, CPU)."""
    if override:
        key = override.lower()
        if key not in PROFILES:
            raise FP8LMError(f"device_for_scales={override!r}: allowed values are "
                             f"{', '.join(p.upper() for p in PROFILES)}")
        return PROFILES[key]
    return CUDA if device.type == "cuda" else CPU


def device_tag(device: torch.device) -> str:
    """What measurement files record as the device: 'cpu' or 'cuda:sm90'."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:sm{major}{minor}"
    return device.type
