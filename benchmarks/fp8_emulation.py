"""CPU cost of FP8 emulation (issue #5), in one run on one machine:
  1. the activation cast: torch's float8 round trip vs fp8lm's float32 grid rounding (both exact);
  2. an FP8 Linear vs the float32 Linear at SmolLM2's shapes;
  3. end-to-end SmolLM2 decode, FP8 (all modules, FP8 KV) vs float32;
  4. peak resident memory while loading, FP8 vs float32 (separate processes).

    python benchmarks/fp8_emulation.py --quant-config CALIBRATION/maxabs_quant_cpu.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from fp8lm.eval.throughput import best_seconds
from fp8lm.fp8.numerics import round_to_fp8_grid


def best_ms(fn, repeats=30) -> float:
    return best_seconds(fn, repeats, warmup=3) * 1e3


def cast_costs() -> None:
    print("activation cast to FP8 values (exact, both):")
    for shape in ((1, 576), (32, 576), (32, 1536), (1200, 576)):
        x = torch.randn(*shape) * 3
        via_torch = best_ms(lambda: (x * 20).clamp(-448, 448).to(torch.float8_e4m3fn).float())
        via_grid = best_ms(lambda: round_to_fp8_grid(x * 20, torch.float8_e4m3fn, 448.0))
        print(f"  {str(shape):12s} torch float8 round trip {via_torch:7.3f} ms   float32 grid {via_grid:7.3f} ms")


def linear_costs() -> None:
    from fp8lm.fp8.formats import CPU
    from fp8lm.fp8.scale_methods import ScaleSpec
    from fp8lm.model.linear import ColumnParallelLinear, pack_linears_for_cpu
    from fp8lm.quant.fp8_linear import quantize_linear
    from fp8lm.quant.fp8_modules import FP8Format

    print("Linear forward, SmolLM2 shapes (float32 oneDNN vs FP8 emulated):")
    for m, n, k in ((1, 1536, 576), (32, 1536, 576), (32, 576, 1536), (32, 49152, 576)):
        hp = ColumnParallelLinear(k, n)
        torch.nn.init.normal_(hp.weight, std=0.05)
        fp8 = ColumnParallelLinear(k, n)
        quantize_linear(fp8, FP8Format(torch.float8_e4m3fn, 448.0), 0.05, None, ScaleSpec(backoff=0.5), None, CPU)
        fp8.load_tensor("weight", hp.weight.detach())
        fp8.format = fp8.format.prepare(fp8, torch.device("cpu"), torch.float32)
        pack_linears_for_cpu(hp, 32)
        x = torch.randn(m, k)
        t_hp, t_fp8 = best_ms(lambda: hp(x)), best_ms(lambda: fp8(x))
        print(f"  {m:>3}x{k}x{n:<6} float32 {t_hp:7.3f} ms   FP8 {t_fp8:7.3f} ms   ratio {t_fp8 / t_hp:.2f}x")


def decode(quant_config: str) -> None:
    from fp8lm import LLM, SamplingParams

    prompts = [f"Question {i}: describe an interesting fact about the number {i}." for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    print("SmolLM2 decode, 32 prompts x 64 tokens and batch-1 x 64 tokens:")
    for label, kwargs in (("float32", {}), ("FP8", dict(quantization="inc", quant_config=quant_config,
                                                        kv_cache_dtype="fp8_inc"))):
        llm = LLM("smollm2-135m-instruct", max_model_len=512, max_num_seqs=32, **kwargs)
        rates = []
        for batch in (prompts, prompts[:1]):
            start = time.perf_counter()
            outs = llm.generate(batch, params, use_tqdm=False)
            rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start))
        print(f"  {label:8s} batch-32 {rates[0]:7.1f} tok/s   batch-1 {rates[1]:6.1f} tok/s")
        del llm


# VmHWM, not ru_maxrss: the latter is inherited from the parent across fork + exec.
_PEAK = """
import json, sys
status = lambda key: int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
kw = json.loads(sys.argv[1])
import fp8lm, transformers
base = status('VmRSS:')
if kw is not None:
    llm = fp8lm.LLM("smollm2-135m-instruct", max_model_len=256, max_num_seqs=1, num_kv_blocks=16, skip_warmup=True, **kw)
print(json.dumps({"peak": status('VmHWM:'), "after": status('VmRSS:'), "imports": base}))
"""


def load_memory(quant_config: str) -> None:
    print("peak resident memory while loading (separate processes):")
    for label, kwargs in (("imports only", None), ("float32", {}),
                          ("FP8", {"quantization": "inc", "quant_config": quant_config, "kv_cache_dtype": "fp8_inc"})):
        out = subprocess.run([sys.executable, "-c", _PEAK, json.dumps(kwargs)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"  {label}: failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {label:14s} peak {r['peak'] / 2**20:6.0f} MiB   resident after load {r['after'] / 2**20:6.0f} MiB   "
              f"(imports {r['imports'] / 2**20:.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quant-config", required=True, help="a QUANTIZE config for SmolLM2 (fp8lm calibrate)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_memory(args.quant_config)
    cast_costs()
    linear_costs()
    decode(args.quant_config)


if __name__ == "__main__":
    main()
