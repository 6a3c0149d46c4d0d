"""fp8lm's compiled CPU FP8 kernels (csrc/): an FP8-weight matmul that reads 1 byte per weight.

The C++ extension is compiled on first use into the fp8lm cache folder (about 20-30 s, once per
machine and torch version) and loaded from there afterwards. Wherever it cannot be built or run
(no compiler, not x86-64, no AVX2), `cpu_kernels()` returns None and FP8 layers keep the PyTorch
reference path; one log line says which path runs. FP8LM_CPU_KERNELS picks it by hand:
auto (default), avx512bf16, avx512, avx2 or off.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from fp8lm.errors import FP8LMError
from fp8lm.fp8.extension_build import build_extension, build_failure
from fp8lm.fp8.numerics import FP8_LAYOUT, gram_from_upper_blocks, to_fp8

log = logging.getLogger(__name__)

PANEL = 32                      # output rows per packed panel (kPanel in csrc/fp8_cpu.cpp)
GRAM_BLOCKS = 2                 # fp8_gram's row blocks: 3/4 of the full product's work (more blocks measured no faster)
ISA_CODES = {"avx2": 1, "avx512": 2, "avx512bf16": 3}   # avx512bf16: W8A8 prefill by bfloat16 dot products
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("fp8_cpu.cpp", "kernels.inc", "attention.inc", "isa_avx2.h", "isa_avx512.h", "decode_stack.h",
            "decode_parts.h", "gemm_bf16dot.h")


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """FP8 weight [N, K] -> uint8 [ceil(N / 32), K, 32]: each panel's 32 rows interleaved along K
    (zero rows pad the last panel). Still 1 byte per weight. A bfloat16 weight keeps its dtype."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    values = weight if weight.dtype == torch.bfloat16 else weight.view(torch.uint8)
    padded = values.new_zeros(panels * PANEL, k)
    padded[:n] = values
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


def unpack_panels(packed: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of pack_panels: the [N, K] FP8 weight."""
    panels, k, _ = packed.shape
    return packed.transpose(1, 2).reshape(panels * PANEL, k)[:n].contiguous().view(dtype)


@dataclass(frozen=True)
class CpuKernels:
    """The loaded extension and the instruction set its calls use."""
    module: object
    isa: str

    def linear(self, x: torch.Tensor, packed: torch.Tensor, out_features: int, fp8_dtype: torch.dtype,
               col_scale: torch.Tensor, row_scale: torch.Tensor, inv_scale: torch.Tensor | None,
               limit: float, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] (float32 or bfloat16) @ FP8 weightᵀ -> [M, N] in x's dtype.

        `col_scale` [N]: the weight scale per output channel times byte_value_factor (kernel_col_scale);
        `row_scale` [1] or [M] multiplies each result row (the input scale). With `inv_scale` ([1] or
        [M]) x is first cast to FP8 values of x * inv_scale, saturated at ±limit: W8A8, exactly.
        """
        if fp8_dtype not in FP8_LAYOUT:
            raise FP8LMError(f"CPU FP8 kernels: unsupported weight dtype {fp8_dtype}; allowed: "
                             f"{', '.join(str(d) for d in FP8_LAYOUT)}")
        if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16):
            raise FP8LMError(f"CPU FP8 kernels: x must be 2-D float32 or bfloat16, got {tuple(x.shape)} {x.dtype}")
        mantissa, min_exp = FP8_LAYOUT[fp8_dtype]
        y = self.module.linear(x.float().contiguous(), packed, out_features, fp8_dtype == torch.float8_e5m2,
                               col_scale, row_scale, inv_scale, float(limit), mantissa, min_exp, bias,
                               ISA_CODES[self.isa])
        return y.to(x.dtype)

    def linear_bf16(self, x: torch.Tensor, packed: torch.Tensor, out_features: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] float32 @ Wᵀ for a bfloat16 W packed by pack_panels -> [M, N] float32: the float32
        matmul of W's values (half the bytes of a float32 weight to read)."""
        if x.dim() != 2 or x.dtype != torch.float32:
            raise FP8LMError(f"CPU kernels: x must be 2-D float32, got {tuple(x.shape)} {x.dtype}")
        return self.module.linear_bf16(x.contiguous(), packed, out_features, bias, ISA_CODES[self.isa])

    def fp8_gram(self, x: torch.Tensor, scale: float, fp8_dtype: torch.dtype, limit: float) -> torch.Tensor:
        """X_qᵀX_q [K, K] float32 for X_q = the FP8 values of x [T, K] at `scale`, times `scale`: the
        W8A8 GEMM with xᵀ as both operands (its FP8 cast as `linear`'s), so every product is exact
        and only the float32 sums' order differs from X_qᵀX_q in float64. Only the blocks on and above
        the diagonal are multiplied (a slice of the packed panels is the panels of the later rows);
        the others are their mirror."""
        xt = x.t().float().contiguous()
        k = xt.shape[0]
        s = torch.tensor([float(scale)])
        packed = pack_panels(to_fp8(xt, 1 / s, fp8_dtype, limit))

        def rows_from(start: int, end: int) -> torch.Tensor:
            n = k - start
            return self.linear(xt[start:end], packed[start // PANEL:], n, fp8_dtype, kernel_col_scale(s, n, fp8_dtype),
                               s, 1 / s, limit)

        return gram_from_upper_blocks(k, PANEL * max(1, -(-k // (GRAM_BLOCKS * PANEL))), rows_from)

    def fake_quant(self, x: torch.Tensor, inv_scale: float, fp8_dtype: torch.dtype, limit: float) -> torch.Tensor:
        """The FP8 values of x * inv_scale saturated at ±limit, as float32: numerics.fake_quant, fused."""
        mantissa, min_exp = FP8_LAYOUT[fp8_dtype]
        return self.module.fake_quant(x.float().contiguous(), float(inv_scale), float(limit), mantissa, min_exp,
                                      ISA_CODES[self.isa])

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, bias: torch.Tensor, scales: list[float],
                        requantize: tuple[bool, bool], fp8_dtype: torch.dtype, limit: float,
                        first_kv: torch.Tensor | None = None) -> torch.Tensor:
        """FP8 attention (casts onto `fp8_dtype`'s grid saturated at `limit`) over paged caches of that
        FP8 dtype, or over float32 caches of the model's K/V (cast onto the matmuls' grids as they are
        read); see csrc/attention.inc paged_attention.

        q float32 (rotated, before 1/sqrt(d)): [B, heads, d] for a decode step with bias
        [B, max_blocks * block_size], or [B, L, heads, d] for L padded queries per sequence with bias
        [B, L, max_blocks * block_size]; caches [kv_heads, blocks, block_size, d]; scales: 1/sqrt(d),
        q·k's two input scales, the softmax output scale, p·v's two input scales, the K and V cache
        scales (unused for float32 caches). first_kv: exact_first_token's float32 [2, kv_heads, rows, d]
        (PagedAttention.first_kv). Returns q's shape.
        """
        mantissa, min_exp = FP8_LAYOUT[fp8_dtype]
        fp8_cache = k_cache.dtype == fp8_dtype
        if fp8_cache:
            k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        return self.module.paged_attention(q, k_cache, v_cache, block_tables, bias, fp8_dtype == torch.float8_e5m2,
                                           self.attention_byte_scales(scales, fp8_dtype),
                                           requantize[0], requantize[1], float(limit), mantissa, min_exp,
                                           k_cache.shape[0], ISA_CODES[self.isa], first_kv)

    def plain_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, bias: torch.Tensor, scale: float,
                        first_kv: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over float32 or bfloat16 paged caches in float32 arithmetic: softmax(q·kᵀ·scale + bias)·v.
        Shapes as `paged_attention`'s."""
        return self.module.plain_paged_attention(q, k_cache, v_cache, block_tables, bias, float(scale),
                                                 k_cache.shape[0], ISA_CODES[self.isa], first_kv)

    @staticmethod
    def attention_byte_scales(scales: list[float], cache_dtype: torch.dtype) -> list[float]:
        """paged_attention's 8 scales as the kernel takes them: the cache scales times byte_value_factor."""
        factor = byte_value_factor(cache_dtype)
        return [float(s) for s in scales[:6]] + [float(s) * factor for s in scales[6:]]

    def decode_stack(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int,
                     eps: float, fp8_dtype: torch.dtype, limit: float):
        """An empty DecodeStack (csrc/decode_stack.h) for layers of these shapes and FP8 format."""
        mantissa, min_exp = FP8_LAYOUT[fp8_dtype]
        return self.module.DecodeStack(hidden, num_heads, num_kv_heads, head_dim, intermediate, float(eps),
                                       fp8_dtype == torch.float8_e5m2, float(limit), mantissa, min_exp,
                                       ISA_CODES[self.isa])

    def write_cache(self, x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, inv_scale: float,
                    limit: float) -> None:
        """New K or V rows x [T, kv_heads, d] into the paged FP8 cache [kv_heads, blocks, block_size, d]
        at `slots`: the bytes of torch's saturating float8 cast of x * inv_scale."""
        mantissa, min_exp = FP8_LAYOUT[cache.dtype]
        self.module.write_cache(x.float().contiguous(), cache.view(torch.uint8), slots.contiguous(),
                                cache.dtype == torch.float8_e5m2, float(inv_scale), float(limit), mantissa, min_exp,
                                ISA_CODES[self.isa])

    def dequantize(self, data: torch.Tensor, scale: float) -> torch.Tensor:
        """float32 values of an FP8 tensor times `scale` (the FP8 KV cache's read path)."""
        if data.dtype not in FP8_LAYOUT:
            raise FP8LMError(f"CPU FP8 kernels: cannot dequantize {data.dtype}")
        return self.module.dequantize(data.contiguous().view(torch.uint8), data.dtype == torch.float8_e5m2,
                                      float(scale) * byte_value_factor(data.dtype), ISA_CODES[self.isa])

    def read_all(self, data: torch.Tensor) -> int:
        """Reads every byte of a uint8 tensor once on all threads: a read-bandwidth probe."""
        return self.module.read_all(data, ISA_CODES[self.isa])


def byte_value_factor(fp8_dtype: torch.dtype) -> float:
    """What the kernels multiply a dequantized byte by: E4M3 bytes dequantize to their value times
    2^-8 (through half-precision bits), E5M2 bytes to their value."""
    return 256.0 if fp8_dtype == torch.float8_e4m3fn else 1.0


def kernel_col_scale(weight_scale, out_features: int, fp8_dtype: torch.dtype) -> torch.Tensor:
    """The kernel's per-channel multiplier: the weight scale times byte_value_factor."""
    s = torch.as_tensor(weight_scale, dtype=torch.float32).reshape(-1) * byte_value_factor(fp8_dtype)
    return s.expand(out_features).contiguous() if s.numel() == 1 else s.contiguous()


def requested_isa() -> str:
    """FP8LM_CPU_KERNELS: auto, off or an ISA name (a bad value is an FP8LMError naming it)."""
    value = os.environ.get("FP8LM_CPU_KERNELS", "auto").strip().lower()
    allowed = ("auto", "off", *ISA_CODES)
    if value not in allowed:
        raise FP8LMError(f"FP8LM_CPU_KERNELS={value!r}: allowed values are {', '.join(allowed)}")
    return value


def _build(cache: Path):
    return build_extension(cache, "fp8lm_cpu", _CSRC, _SOURCES, "the CPU kernels'", log)


@functools.cache
def cpu_kernels() -> CpuKernels | None:
    """The compiled kernels, or None (and one log line saying why) where they cannot run."""
    from fp8lm.files import cache_dir

    want = requested_isa()
    if want == "off":
        log.info("CPU FP8 matmul: PyTorch reference path (FP8LM_CPU_KERNELS=off)")
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.warning("CPU FP8 kernels need x86-64 (this is %s): using the PyTorch reference path", platform.machine())
        return None
    try:
        module, seconds = _build(cache_dir())
    except Exception as e:   # no compiler, no ninja, a failed build: fall back, never crash
        log.warning("CPU FP8 kernels could not be built (%s): using the PyTorch reference path", build_failure(e))
        return None
    if module.PANEL != PANEL:
        raise FP8LMError(f"CPU FP8 kernels: the extension packs {module.PANEL} rows per panel, the wrapper {PANEL}")
    best = {0: None, **{code: name for name, code in ISA_CODES.items()}}[module.isa()]
    if best is None:
        log.warning("CPU FP8 kernels need AVX2, FMA and F16C, which this CPU lacks: using the PyTorch reference path")
        return None
    isa = best if want == "auto" else want
    if ISA_CODES[isa] > ISA_CODES[best]:
        raise FP8LMError(f"FP8LM_CPU_KERNELS={want}: this CPU supports at most {best}")
    built = f", compiled in {seconds:.0f} s" if seconds is not None else ""
    log.info("CPU FP8 matmul: compiled %s kernels, 1 byte per weight%s", isa, built)
    return CpuKernels(module, isa)


def kernels_for(device) -> CpuKernels | None:
    """The CPU kernels for tensors on `device`: None off the CPU (or where they cannot run)."""
    return cpu_kernels() if device.type == "cpu" else None
