"""FP8 W8A8 GEMMs of many rows (prompt chunks) on oneDNN's matmul (csrc/onednn_gemm.cpp), which runs
on AMX or AVX-512 BF16 where the CPU has them; fewer rows stay on the CPU kernels.

Exact by construction: the activations are cast to their FP8 values by the kernels' own cast, every
FP8 value is exact in bfloat16 and float32, the products of two are exact in float32, so oneDNN's
bf16 x bf16 -> f32 matmul differs from the kernels' GEMM only in the float32 sums' order. The
weights stay in the kernels' FP8 panels (1 byte each) and are widened into oneDNN's layout per call.

oneDNN comes from the `onednn-cpu-gomp` wheel (GNU OpenMP, as torch). FP8LM_CPU_GEMM picks the GEMM:
kernels (default) or onednn (bfloat16 where oneDNN has it on this CPU, else float32).
"""
from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from pathlib import Path

import torch

from fp8lm.errors import FP8LMError
from fp8lm.fp8.cpu_kernels import CpuKernels, byte_value_factor
from fp8lm.fp8.extension_build import build_extension, build_failure
from fp8lm.fp8.numerics import fake_quant

log = logging.getLogger(__name__)

GEMM_CHOICES = ("kernels", "onednn")
MIN_ROWS = 64               # fewer rows: the kernels (the per-call widening would outweigh the GEMM)
LAYOUT_ROWS = 512           # the row count oneDNN chooses its weight layout for (a prompt chunk)
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("onednn_gemm.cpp", "onednn_widen.h")
_LIBRARY = "libdnnl.so.3"


def requested_gemm() -> str:
    value = os.environ.get("FP8LM_CPU_GEMM", "kernels").strip().lower()
    if value not in GEMM_CHOICES:
        raise FP8LMError(f"FP8LM_CPU_GEMM={value!r}: allowed values are {', '.join(GEMM_CHOICES)}")
    return value


def onednn_library_dir() -> Path | None:
    """The folder of the `onednn-cpu-gomp` wheel's libdnnl, or None where it is not installed."""
    try:
        files = importlib.metadata.distribution("onednn-cpu-gomp").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [Path(f.locate()).resolve() for f in files if Path(str(f)).name == _LIBRARY]
    return found[0].parent if found and found[0].is_file() else None


@functools.cache
def onednn_module():
    """The compiled oneDNN extension; FP8LMError saying why where it cannot be had."""
    from fp8lm.files import cache_dir

    lib = onednn_library_dir()
    if lib is None:
        raise FP8LMError("the oneDNN GEMM needs the onednn-cpu-gomp wheel: pip install onednn-cpu-gomp==2023.2.0")
    try:
        module, _ = build_extension(cache_dir(), "fp8lm_onednn", _CSRC, _SOURCES, "the oneDNN GEMM's", log,
                                    (f"-L{lib}", f"-l:{_LIBRARY}", f"-Wl,-rpath,{lib}"))
    except Exception as e:
        raise FP8LMError(f"the oneDNN GEMM could not be built: {build_failure(e)}") from e
    return module


class OneDnnFP8Gemm:
    """CpuKernels.linear's contract over FP8 panels: from `min_rows` rows with an FP8 input cast, oneDNN's
    matmul in `element` (bfloat16 or float32); otherwise the kernels."""

    def __init__(self, kernels: CpuKernels, module, element: torch.dtype, min_rows: int = MIN_ROWS):
        if element not in (torch.bfloat16, torch.float32):
            raise FP8LMError(f"oneDNN GEMM: element type must be bfloat16 or float32, not {element}")
        self.kernels, self.module, self.element, self.min_rows = kernels, module, element, min_rows
        self.element_name = str(element).replace("torch.", "")
        self.implementation = module.probe(element.itemsize)
        if not self.implementation:
            raise FP8LMError(f"oneDNN {module.version()} has no {element} matmul on this CPU")
        self._plans: dict[tuple[int, int], tuple[object, torch.Tensor]] = {}
        self._warned: set = set()

    def linear(self, x: torch.Tensor, packed: torch.Tensor, out_features: int, fp8_dtype: torch.dtype,
               col_scale: torch.Tensor, row_scale: torch.Tensor, inv_scale: torch.Tensor | None,
               limit: float, bias: torch.Tensor | None = None) -> torch.Tensor:
        many = x.shape[0] >= self.min_rows and inv_scale is not None
        plan, widened = self.plan(x.shape[1], out_features) if many else (None, None)
        if plan is None or self.reference_only(plan, x.shape[0]):
            return self.kernels.linear(x, packed, out_features, fp8_dtype, col_scale, row_scale, inv_scale, limit, bias)
        if inv_scale.numel() == 1:
            xq = self.kernels.fake_quant(x, inv_scale.item(), fp8_dtype, limit)
        else:
            xq = fake_quant(x, inv_scale.reshape(-1, 1), fp8_dtype, limit)
        plan.widen(packed, fp8_value_table(fp8_dtype, self.element), widened, fp8_dtype == torch.float8_e5m2)
        y = plan.matmul(xq.to(self.element).contiguous(), widened)
        self.module.epilogue(y, col_scale, row_scale.float().contiguous(),
                             None if bias is None else bias.float().contiguous())
        return y.to(x.dtype)

    def reference_only(self, plan, rows: int) -> bool:
        """Whether oneDNN would run its reference implementation (slow) for this weight layout at this
        row count; the kernels do those. Logged once per plan."""
        implementation = plan.impl_for(rows)
        if not implementation.startswith("ref"):
            return False
        if plan not in self._warned:
            self._warned.add(plan)
            log.warning("oneDNN has only %s for this %s weight at %d rows: the kernels run it", implementation,
                        plan.layout_impl(), rows)
        return True

    def plan(self, k: int, n: int):
        """oneDNN's plan for a [n, k] weight and the buffer its widened weights go to (one per shape,
        shared by the layers of that shape, which run one after another)."""
        if (k, n) not in self._plans:
            plan = self.module.GemmPlan(k, n, self.element.itemsize, LAYOUT_ROWS)
            self._plans[k, n] = plan, torch.zeros(plan.packed_bytes(), dtype=torch.uint8)
            log.debug("oneDNN GEMM %dx%d: %s", k, n, plan.layout_impl())
        return self._plans[k, n]



@functools.cache
def fp8_value_table(fp8_dtype: torch.dtype, element: torch.dtype) -> torch.Tensor:
    """Each FP8 byte's value as the kernels dequantize it (E4M3: times 2^-8, which their column scale
    undoes), as the bits of `element` (bfloat16 or float32): GemmPlan.widen's table."""
    bits = torch.int16 if element == torch.bfloat16 else torch.int32
    values = (torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float() / byte_value_factor(fp8_dtype)).to(element)
    return values.view(bits).contiguous()


@functools.cache
def onednn_fp8_gemm(kernels: CpuKernels) -> OneDnnFP8Gemm:
    """The oneDNN GEMM in bfloat16 where oneDNN has it on this CPU, else float32."""
    module = onednn_module()
    element = torch.bfloat16 if module.probe(2) else torch.float32
    gemm = OneDnnFP8Gemm(kernels, module, element)
    log.info("CPU FP8 GEMM: oneDNN %s %s matmul (%s) from %d rows, the %s kernels below", module.version(),
             gemm.element_name, gemm.implementation, gemm.min_rows, kernels.isa)
    return gemm


def fp8_gemm_for(kernels: CpuKernels):
    """What FP8 panels multiply with: the kernels, or the oneDNN GEMM where FP8LM_CPU_GEMM asks for it."""
    return kernels if requested_gemm() == "kernels" else onednn_fp8_gemm(kernels)
