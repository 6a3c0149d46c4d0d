"""One short GPU run: native FP8 matmul vs the CPU emulation, SmolLM2 greedy in bf16 and FP8 on the
GPU vs the CPU, and FP8 vs bf16 timings. On a machine without CUDA it runs the CPU part and says
which checks it skipped (the test suite runs it that way, so it cannot rot).

    python benchmarks/gpu_check.py [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from fp8lm.fp8.numerics import fake_quant, to_fp8


def emulated(x, w, sx, sw):
    """The CPU path's arithmetic: FP8 values accumulated in float64 here, then scaled."""
    xq = fake_quant(x.cpu(), 1 / sx, torch.float8_e4m3fn, 448.0).double()
    wq = fake_quant(w.cpu(), 1 / sw, torch.float8_e4m3fn, 448.0).double()
    return xq @ wq.T * (sx * sw)


def check_matmul(device: torch.device, sizes) -> list[str]:
    from fp8lm.fp8.matmul import native_fp8_available, scaled_mm

    rows = []
    for m, n, k in sizes:
        x, w = torch.randn(m, k), torch.randn(n, k)
        sx, sw = float(x.abs().max() / 448), float(w.abs().max() / 448)
        ref = emulated(x, w, sx, sw)
        if native_fp8_available(device):
            x8 = to_fp8(x.to(device), 1 / sx, torch.float8_e4m3fn, 448.0)
            w8 = to_fp8(w.to(device), 1 / sw, torch.float8_e4m3fn, 448.0)
            out = scaled_mm(x8, w8, torch.tensor([sx], device=device), torch.tensor([sw], device=device),
                            torch.float32).double().cpu()
            path = "native _scaled_mm"
        else:
            out = (fake_quant(x, 1 / sx, torch.float8_e4m3fn, 448.0) @ fake_quant(w, 1 / sw, torch.float8_e4m3fn,
                                                                                   448.0).T * (sx * sw)).double()
            path = "cpu emulation (float32)"
        rel = float((out - ref).norm() / ref.norm())
        rows.append(f"matmul {m}x{k} @ {k}x{n}: {path}, relative error vs float64 emulation {rel:.2e}")
        if rel > 1e-3:
            raise SystemExit(f"FAILED: {rows[-1]}")
    return rows


def time_matmuls(device: torch.device, sizes) -> list[str]:
    from fp8lm.fp8.matmul import scaled_mm

    rows = []
    for m, n, k in sizes:
        x, w = torch.randn(m, k, device=device, dtype=torch.bfloat16), torch.randn(n, k, device=device, dtype=torch.bfloat16)
        x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        timings = {}
        for label, fn in (("bf16", lambda: x @ w.T), ("fp8", lambda: scaled_mm(x8, w8, one, one, torch.bfloat16))):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            timings[label] = (time.perf_counter() - start) / 20
        tflops = lambda t: 2 * m * n * k / t / 1e12  # noqa: E731
        rows.append(f"{m:>5}x{n:>5}x{k:>5}  bf16 {tflops(timings['bf16']):7.1f} TFLOP/s  fp8 "
                    f"{tflops(timings['fp8']):7.1f} TFLOP/s  speed-up {timings['bf16'] / timings['fp8']:.2f}x")
    return rows


def check_block_fp8(device: torch.device) -> str:
    """Block-FP8 (128x128 weight blocks, 1x128 input groups) through torch's blockwise GEMM, as
    fp8lm's prepare step chooses it: its probe against the reference on a partial block."""
    from fp8lm.quant.block_fp8 import blockwise_mm_works

    if blockwise_mm_works(device):
        return "block-FP8: native blockwise F.scaled_mm equals the reference (the engine uses it)"
    return "block-FP8: native blockwise F.scaled_mm unavailable or different here (reference path; see the log)"


def check_model(device: torch.device, max_tokens: int) -> list[str]:
    from fp8lm import LLM, SamplingParams
    from fp8lm.entrypoints.calibrate import calibrate

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cal = calibrate("smollm2-135m-instruct", "builtin", tmp, num_samples=8, max_seq_len=256, max_tokens=4,
                        device=str(device), dtype="bfloat16", use_tqdm=False)
        cpu = [o.outputs[0].token_ids for o in LLM("smollm2-135m-instruct", device="cpu", dtype="float32",
                                                    max_model_len=256).generate(prompts, params, use_tqdm=False)]
        for label, kwargs in (("bf16", {}), ("fp8", dict(quantization="inc", quant_config=str(cal.quant_config),
                                                          kv_cache_dtype="fp8_inc"))):
            runs = {}
            for eager in (True, False):      # CUDA graphs of decode steps (the default) vs --enforce-eager
                llm = LLM("smollm2-135m-instruct", device=str(device), dtype="bfloat16", max_model_len=256,
                          enforce_eager=eager, **kwargs)
                start = time.perf_counter()
                outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
                runs[eager] = (outs, sum(map(len, outs)) / (time.perf_counter() - start), llm.engine.runner.graphs)
                del llm
            outs, rate, _ = runs[False]
            same = sum(a == b for a, b in zip(outs, cpu))
            first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(outs, cpu)]
            captured = runs[False][2] is not None and all(st.graph is not None for st in runs[False][2].steps.values())
            rows.append(f"SmolLM2 {label} on {device}: {same}/3 identical to CPU float32, first divergence at "
                        f"{first}, {rate:.1f} tok/s with CUDA graphs ({'captured' if captured else 'NOT captured'}), "
                        f"{runs[True][1]:.1f} eager ({rate / runs[True][1]:.2f}x); graphs vs eager outputs "
                        f"{sum(a == b for a, b in zip(outs, runs[True][0]))}/3 identical")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (what the test suite runs)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sizes = [(16, 32, 64)] if args.quick else [(1, 4096, 4096), (64, 4096, 4096), (512, 11008, 4096)]
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if cuda else 'cpu'}"
          + (f", compute capability {torch.cuda.get_device_capability()}" if cuda else ""))
    for row in check_matmul(device, sizes):
        print(row)
    if not cuda:
        print("CUDA not available: skipped native FP8 timings and the SmolLM2 GPU comparison")
        return
    if torch.cuda.get_device_capability() < (8, 9):
        print("compute capability < 8.9: no native FP8 matmul; skipped FP8 timings")
    else:
        print("\n".join(time_matmuls(device, [(1, 4096, 4096), (64, 4096, 4096), (2048, 4096, 4096),
                                               (4096, 14336, 4096)])))
        print(check_block_fp8(device))
    print("\n".join(check_model(device, 8 if args.quick else 32)))


if __name__ == "__main__":
    main()
