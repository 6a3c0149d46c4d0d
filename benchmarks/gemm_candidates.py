"""Candidates for fp8lm's compute-bound FP8 GEMMs (prefill chunks, batched decode), side by side in one
run at SmolLM2's shapes: GFLOP/s and the error against float64 on the same FP8 values.

- fp8lm's CPU kernel (what FP8Panels runs by default: AVX-512 BF16 dot products or AVX2);
- fp8lm's oneDNN GEMM (FP8LM_CPU_GEMM=onednn: bfloat16 where oneDNN has it, AMX where the CPU has it),
  per call as FP8Panels runs it, and its oneDNN matmul alone on operands made once;
- torch._scaled_mm on the CPU (oneDNN's FP8 matmul, float32 output: exact up to summation order);
- oneDNN's qlinear with FP8 operands and a prepacked weight (the path vLLM's CPU backend uses for int8);
- torch's bfloat16 F.linear on the same FP8 values: oneDNN's bf16 GEMM (AMX where the CPU has it), for
  speed only: its bfloat16 output rounds what the FP8 GEMM defines.

Issue #27 asks for the faster, simpler exact candidate on a machine with AMX; this prints what this
machine has.

    python benchmarks/gemm_candidates.py [--rows 16,128,512,2048]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from fp8lm.eval.throughput import best_seconds

SHAPES = {"q_proj/o_proj": (576, 576), "gate/up_proj": (1536, 576), "down_proj": (576, 1536)}   # (N, K)


def candidates(x8: torch.Tensor, w8: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor):
    """name -> a call computing x8 @ w8ᵀ * sx * sw in float32 (or None where this torch lacks it)."""
    from fp8lm.fp8.cpu_kernels import cpu_kernels, kernel_col_scale, pack_panels

    n, k = w8.shape
    out = {}
    kernels = cpu_kernels()
    if kernels is not None:
        packed, col = pack_panels(w8), kernel_col_scale(sw, n, w8.dtype)
        x = x8.float() * sx
        out[f"fp8lm kernel ({kernels.isa})"] = lambda: kernels.linear(x, packed, n, w8.dtype, col, sx, 1 / sx, 448.0)
        out.update(onednn_candidates(kernels, x, packed, n, col, sx))
    out["torch._scaled_mm (oneDNN FP8)"] = lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw,
                                                                      out_dtype=torch.float32)
    prepacked = torch.ops.onednn.qlinear_prepack(w8, [x8.shape[0], k])
    zero = torch.zeros(n, dtype=torch.long)
    sw_rows = sw.expand(n).contiguous()
    out["oneDNN qlinear FP8, prepacked"] = lambda: torch.ops.onednn.qlinear_pointwise(
        x8, float(sx), 0, prepacked, sw_rows, zero, None, 1.0, 0, torch.float32, "none", [], "")
    xb, wb = x8.to(torch.bfloat16), w8.to(torch.bfloat16)
    out["torch bf16 F.linear (bf16 out)"] = lambda: F.linear(xb, wb).float() * (sx * sw)
    return out


def onednn_candidates(kernels, x, packed, n, col, sx):
    """fp8lm's oneDNN GEMM (FP8LM_CPU_GEMM=onednn: the FP8 cast, the weights widened from the panels,
    oneDNN's matmul, the epilogue; every call), and oneDNN's matmul alone on operands made once."""
    from fp8lm.errors import FP8LMError
    from fp8lm.fp8.onednn_gemm import fp8_value_table, onednn_fp8_gemm

    try:
        gemm = onednn_fp8_gemm(kernels)
    except FP8LMError as e:
        print(f"oneDNN GEMM unavailable: {e}")
        return {}
    gemm.min_rows = 1
    plan, widened = gemm.plan(x.shape[1], n)
    plan.widen(packed, fp8_value_table(torch.float8_e4m3fn, gemm.element), widened, False)
    xe = (x / sx).to(torch.float8_e4m3fn).to(gemm.element)
    return {f"fp8lm oneDNN GEMM ({gemm.element_name}, {gemm.implementation})":
            lambda: gemm.linear(x, packed, n, torch.float8_e4m3fn, col, sx, 1 / sx, 448.0),
            "  its oneDNN matmul alone (+ one scaling pass)": lambda: plan.matmul(xe, widened).mul_(col * sx)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="16,128,512,2048")
    args = parser.parse_args()
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        line = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    print(f"CPU flags: {' '.join(f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_int8', 'amx_fp16') if f in flags)}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    gen = torch.Generator().manual_seed(0)
    for label, (n, k) in SHAPES.items():
        for m in (int(r) for r in args.rows.split(",")):
            x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
            sx, sw = (x.abs().max() / 448).reshape(()), (w.abs().max() / 448).reshape(())
            x8, w8 = (x / sx).to(torch.float8_e4m3fn), (w / sw).to(torch.float8_e4m3fn)
            exact = (x8.double() @ w8.double().T) * float(sx) * float(sw)
            cells = []
            for name, fn in candidates(x8, w8, sx.reshape(1), sw.reshape(1)).items():
                try:
                    error = float(((fn().double() - exact).abs().max() / exact.abs().max()))
                    cells.append(f"{name}: {2 * m * n * k / best_seconds(fn, 5) / 1e9:6.1f} GFLOP/s (rel err {error:.0e})")
                except (RuntimeError, NotImplementedError) as e:
                    cells.append(f"{name}: unavailable ({str(e).splitlines()[0][:60]})")
            print(f"{label} {m}x{k} @ {k}x{n}:\n  " + "\n  ".join(cells))


if __name__ == "__main__":
    main()
