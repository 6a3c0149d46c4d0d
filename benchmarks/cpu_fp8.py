"""CPU FP8 kernels, side by side in one run: read bandwidth, per-op GEMV bandwidth, resident memory,
batch-1 decode (fp8lm FP8 — default recipe, and with the LM head in FP8 too; the decode step in one
call and layer by layer — vs fp8lm float32 vs transformers float32 vs llama.cpp Q8_0), where an FP8
decode token's time goes, prefill of 512 and 4,096 tokens (fp8lm FP8 vs llama.cpp Q8_0) and
32-sequence throughput (FP8 vs float32) on SmolLM2.

    python benchmarks/cpu_fp8.py [--threads 2] [--tokens 128] [--skip-llama-cpp]

llama.cpp comes from the optional extra `pip install -e '.[bench]'` (llama-cpp-python compiles from
PyPI in a few minutes); the shipped GGUF is requantized to Q8_0 with its llama_model_quantize. Each
llama.cpp measurement runs in a process of its own: llama-cpp-python 0.3.36 built from source
segfaults in decode on an AMX Xeon, and its crash leaves out its figures, not the benchmark.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from fp8lm.eval.throughput import best_seconds, make_prompts, run_fp8lm, run_transformers

SMOLLM2_SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate/up_proj": (1536, 576),
                  "down_proj": (576, 1536), "lm_head": (49152, 576), "4096x4096": (4096, 4096)}
STREAMED_BYTES = 512 << 20      # weights rotated per op: far beyond the last-level cache


def streamed_seconds(weights: list, op) -> float:
    """Seconds per call of op(weight), cycling through copies of a weight too large together to
    stay cached: every call reads its weight from memory."""
    return best_seconds(lambda: [op(w) for w in weights], 3) / len(weights)


def per_op(kernels) -> None:
    """Each op's streamed bandwidth next to a read-bandwidth probe taken just before it (this
    machine's bandwidth drifts with its neighbours' load)."""
    from fp8lm.fp8.cpu_kernels import kernel_col_scale, pack_panels

    probe = torch.randint(0, 256, (STREAMED_BYTES,), dtype=torch.uint8)
    print("\nper-op, batch 1, weights streamed from memory (rotating copies > cache):")
    for label, (n, k) in SMOLLM2_SHAPES.items():
        w = (torch.randn(n, k) * 8).to(torch.float8_e4m3fn)
        col, one = kernel_col_scale(0.01, n, torch.float8_e4m3fn), torch.tensor([1.0])
        x = torch.randn(1, k)
        read_gbs = STREAMED_BYTES / best_seconds(lambda: kernels.read_all(probe), 3) / 1e9
        t8 = streamed_seconds([pack_panels(w) for _ in range(max(2, STREAMED_BYTES // (n * k)))],
                              lambda p: kernels.linear(x, p, n, torch.float8_e4m3fn, col, one, one, 448.0))
        t32 = streamed_seconds([torch.ops.mkldnn._reorder_linear_weight(w.float(), 1)
                                for _ in range(max(2, STREAMED_BYTES // (4 * n * k)))],
                               lambda d: torch.ops.mkldnn._linear_pointwise(x, d, None, "none", [], ""))
        gbs = n * k / t8 / 1e9
        print(f"  {label:14s} {n:5d}x{k:<5d} FP8 {t8 * 1e6:7.1f} us {gbs:5.1f} GB/s = {gbs / read_gbs:4.0%} of read "
              f"({read_gbs:4.1f})   float32 oneDNN {t32 * 1e6:7.1f} us ({4 * n * k / t32 / 1e9:4.1f} GB/s)   "
              f"FP8 speed-up {t32 / t8:4.2f}x")


RSS_CODE = """
import sys, torch
torch.set_num_threads({threads})
from fp8lm import LLM, SamplingParams
kw = {kw!r}
llm = LLM({model!r}, max_model_len=512, max_num_seqs=1, num_kv_blocks=32, skip_warmup=True, **kw)
llm.generate(["Hello"], SamplingParams(max_tokens=8), use_tqdm=False)
from fp8lm.model.linear import OneDNNPacked, ParallelLinear
from fp8lm.quant.fp8_linear import FP8Panels
m = llm.engine.host.model
formats = [mod.format for mod in m.modules() if isinstance(mod, ParallelLinear)]
fp8 = sum(f.packed.numel() for f in formats if isinstance(f, FP8Panels))
dense = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()) if not t.is_meta)
packed32 = sum(f.packed.to_dense().numel() * 4 for f in formats if isinstance(f, OneDNNPacked))
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
print(fp8, dense + packed32, rss)
"""


def resident_memory(model: str, quant_config: str, threads: int) -> None:
    print("\nresident memory (fresh process each; KV cache 32 blocks):")
    base = int(subprocess.run([sys.executable, "-c", "import torch, fp8lm.entrypoints.llm; "
                               "print(int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024)"],
                              capture_output=True, text=True, check=True).stdout.split()[-1])
    rows = {}
    for label, kw in (("float32", {}), ("FP8", {"quantization": "inc", "quant_config": quant_config,
                                                "kv_cache_dtype": "fp8_inc"})):
        out = subprocess.run([sys.executable, "-c", RSS_CODE.format(threads=threads, kw=kw, model=model)],
                             capture_output=True, text=True, check=True).stdout.split()
        fp8, dense, rss = (int(v) for v in out[-3:])
        rows[label] = rss - base
        print(f"  {label:8s} FP8 weight bytes {fp8 / 2**20:7.1f} MiB, other tensors {dense / 2**20:7.1f} MiB, "
              f"RSS {rss / 2**20:7.1f} MiB ({(rss - base) / 2**20:7.1f} MiB above `import torch, fp8lm`)")
    print(f"  FP8 / float32 resident (above the imports): {rows['FP8'] / rows['float32']:.2f}")


def llama_cpp_model(gguf: Path, threads: int, n_ctx: int = 512):
    """llama.cpp over the shipped GGUF requantized to Q8_0, or None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        print("  llama.cpp Q8_0: skipped (pip install -e '.[bench]' for llama-cpp-python)")
        return None
    q8 = Path(tempfile.gettempdir()) / f"{gguf.stem}-Q8_0.gguf"
    if not q8.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        params.allow_requantize = True
        params.nthread = threads
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(q8).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize failed for {gguf}")
    return llama_cpp.Llama(str(q8), n_ctx=n_ctx, n_threads=threads, n_batch=512, verbose=False)


def isolated(what: str, fn, *args):
    """fn(*args) in a child process; None, with a message, where the child dies (a signal)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            print(f"  llama.cpp Q8_0 {what}: its process died (llama-cpp-python crashed, e.g. SIGSEGV in decode); "
                  "left out")
            return None


def llama_cpp_decode(gguf: Path, tokens: int, threads: int, prompt: list[int]) -> float | None:
    llm = llama_cpp_model(gguf, threads)
    if llm is None:
        return None
    gen = llm.generate(prompt, temp=0.0, reset=True)
    for _ in range(4):      # warm-up
        next(gen)
    start = time.perf_counter()
    gen = llm.generate(prompt, temp=0.0, reset=True)
    for _ in range(tokens):
        next(gen)
    return tokens / (time.perf_counter() - start)


def decode_profile(llm, prompt: list[int], tokens: int) -> None:
    """Milliseconds per batch-1 decode token: the decoder (one DecodeStack call), the LM head, and
    everything else (embedding, final norm, sampling, scheduling, detokenizing)."""
    from fp8lm.eval.throughput import run_fp8lm

    model = llm.engine.host.model
    spent = {"decoder (one call)": 0.0, "LM head": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[key] += time.perf_counter() - start
            return out
        return wrapper

    stack, logits = model.model.fused_decode, model.compute_logits
    if stack is None:
        print("  (no fused decode step: not profiled)")
        return
    model.model.fused_decode = type("Timed", (), {"applies": stack.applies,
                                                  "__call__": staticmethod(timed(stack, "decoder (one call)"))})()
    model.compute_logits = timed(logits, "LM head")
    try:
        t, n = run_fp8lm(llm, [prompt], tokens)
    finally:
        model.model.fused_decode, model.compute_logits = stack, logits
    print(f"\nwhere a batch-1 FP8 decode token goes ({t / n * 1e3:.2f} ms per token over {n} tokens, "
          "the prompt's prefill included in the last line):")
    for key, value in spent.items():
        print(f"  {key:22s} {value / n * 1e3:6.2f} ms")
    print(f"  {'everything else':22s} {(t - sum(spent.values())) / n * 1e3:6.2f} ms")


def prefill_rates(llm, lengths: list[int], threads: int, skip_llama_cpp: bool) -> None:
    """Prompt tokens per second of one prefill of each length (held-out text), fp8lm vs llama.cpp."""
    from fp8lm import SamplingParams
    from fp8lm.eval.perplexity import read_text
    from fp8lm.model.registry import gguf_file

    text = llm.engine.tokenizer.encode(read_text(None))
    prompts = {n: (text * (n // len(text) + 1))[:n] for n in lengths}
    ours = {}
    for n, prompt in prompts.items():
        llm.generate([prompt[:64]], SamplingParams(max_tokens=1), use_tqdm=False)
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
        ours[n] = n / (time.perf_counter() - start)
    cpp = None if skip_llama_cpp else isolated("prefill", llama_cpp_prefill, gguf_file("smollm2-135m-instruct"),
                                                    prompts, threads)
    print("\nprefill (one prompt of held-out text, tokens/s):")
    for n, prompt in prompts.items():
        line = f"  {n:5d} tokens: fp8lm FP8 {ours[n]:7.1f}"
        if cpp:
            line += f"   llama.cpp Q8_0 {cpp[n]:7.1f}   ratio {ours[n] / cpp[n]:.2f}x"
        print(line)


def llama_cpp_prefill(gguf: Path, prompts: dict[int, list[int]], threads: int) -> dict[int, float] | None:
    cpp = llama_cpp_model(gguf, threads, max(prompts) + 64)
    if cpp is None:
        return None
    rates = {}
    for n, prompt in prompts.items():
        cpp.reset()
        cpp.eval(prompt[:64])
        cpp.reset()
        start = time.perf_counter()
        cpp.eval(prompt)
        rates[n] = n / (time.perf_counter() - start)
    return rates


def lm_head_in_fp8(quant_config: Path) -> Path:
    """The same calibration's config with the LM head quantized too (its blocklist emptied)."""
    import json

    cfg = json.loads(quant_config.read_text())
    cfg["blocklist"] = {"types": [], "names": []}
    path = quant_config.with_name("quant_config_lm_head_fp8.json")
    path.write_text(json.dumps(cfg, indent=2))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--skip-llama-cpp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from fp8lm import LLM
    from fp8lm.entrypoints.calibrate import calibrate
    from fp8lm.fp8 import cpu_kernels as ck
    from fp8lm.model.registry import gguf_file, pull

    kernels = ck.cpu_kernels()
    if kernels is None:
        sys.exit("the CPU FP8 kernels are unavailable here (see the log line above)")
    model = str(pull("smollm2-135m-instruct"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, kernels {kernels.isa}")
    print("read bandwidth probe: the kernels' read_all (every byte once, all threads, AVX loads), "
          f"best of 3 over {STREAMED_BYTES >> 20} MiB, taken before each op")
    per_op(kernels)

    cal = calibrate(model, "builtin", Path(tempfile.mkdtemp(prefix="fp8lm-bench-")), num_samples=16,
                    max_seq_len=256, max_tokens=8, use_tqdm=False)
    quant_config = str(cal.quant_config)
    resident_memory(model, quant_config, args.threads)

    fp8_kw = {"quantization": "inc", "quant_config": quant_config, "kv_cache_dtype": "fp8_inc"}
    engines = {"fp8lm float32": {}, "fp8lm FP8": fp8_kw,
               "fp8lm FP8, LM head FP8 too": {**fp8_kw, "quant_config": str(lm_head_in_fp8(cal.quant_config))}}
    print(f"\nend to end, SmolLM2, {args.tokens} new tokens per sequence (greedy, EOS ignored):")
    results: dict[str, dict[str, float]] = {}
    for label, kw in engines.items():
        llm = LLM(model, max_model_len=1024, max_num_seqs=32, **kw)
        prompts = make_prompts(llm.engine.tokenizer, 32)
        for batch_label, batch in (("batch-1", prompts[:1]), ("32 sequences", prompts)):
            run_fp8lm(llm, batch[:1], 8)
            t, n = run_fp8lm(llm, batch, args.tokens)
            results.setdefault(batch_label, {})[label] = n / t
        if label == "fp8lm FP8":
            stack, llm.engine.host.model.model.fused_decode = llm.engine.host.model.model.fused_decode, None
            t, n = run_fp8lm(llm, prompts[:1], args.tokens)
            results["batch-1"]["fp8lm FP8, layer by layer"] = n / t
            llm.engine.host.model.model.fused_decode = stack
            decode_profile(llm, prompts[0], args.tokens)
        llm.engine.shutdown()
        del llm
    llm = LLM(model, max_model_len=4160, max_num_seqs=1, enable_prefix_caching=False, **fp8_kw)
    prefill_rates(llm, [512, 4096], args.threads, args.skip_llama_cpp)
    llm.engine.shutdown()
    del llm
    os.environ["FP8LM_CPU_KERNELS"] = "off"          # the PyTorch reference path, same process
    ck.cpu_kernels.cache_clear()
    llm = LLM(model, max_model_len=1024, max_num_seqs=1, **fp8_kw)
    t, n = run_fp8lm(llm, prompts[:1], args.tokens)
    results["batch-1"]["fp8lm FP8, reference path"] = n / t
    llm.engine.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    run_transformers(hf, 0, prompts[:1], 8)
    t, n = run_transformers(hf, 0, prompts[:1], args.tokens)
    results["batch-1"]["transformers float32"] = n / t
    if not args.skip_llama_cpp:
        tok_s = isolated("decode", llama_cpp_decode, gguf_file("smollm2-135m-instruct"), args.tokens, args.threads,
                         prompts[0])
        if tok_s is not None:
            results["batch-1"]["llama.cpp Q8_0"] = tok_s
    for batch_label, row in results.items():
        print(f"  {batch_label}:")
        for label, tok_s in row.items():
            print(f"    {label:28s} {tok_s:7.1f} tok/s")
    b1, b32 = results["batch-1"], results["32 sequences"]
    print(f"  batch-1 FP8 / fp8lm float32      {b1['fp8lm FP8'] / b1['fp8lm float32']:.2f}x  (target >= 2)")
    print(f"  batch-1 FP8 / transformers fp32  {b1['fp8lm FP8'] / b1['transformers float32']:.2f}x")
    print(f"  batch-1 FP8 one call / layer by layer {b1['fp8lm FP8'] / b1['fp8lm FP8, layer by layer']:.2f}x")
    if "llama.cpp Q8_0" in b1:
        for label in ("fp8lm FP8", "fp8lm FP8, LM head FP8 too"):
            print(f"  batch-1 {label} / llama.cpp Q8_0  {b1[label] / b1['llama.cpp Q8_0']:.2f}x  (target >= 1.0)")
    print(f"  batch-1 kernels / reference path {b1['fp8lm FP8'] / b1['fp8lm FP8, reference path']:.2f}x")
    print(f"  32 sequences FP8 / float32       {b32['fp8lm FP8'] / b32['fp8lm float32']:.2f}x  (target >= 1.3)")


if __name__ == "__main__":
    main()
