"""Load generator for `fp8lm serve`: concurrency 1, 8, 32 over streaming completions, reporting
requests/s, output tokens/s, TTFT and inter-token latency p50/p99; then the same prompts through
offline `LLM.generate` in this process (after the server stops, so they never share the CPUs).
Target (issue #6): at concurrency 32 the server's output tokens/s is within 15% of offline.

    python benchmarks/serve.py [--model smollm2-135m-instruct] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
import openai


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def start_server(model: str, max_seqs: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fp8lm", "serve", model, "--port", str(port), "--max-model-len",
                             "1024", "--max-num-seqs", str(max_seqs)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)


async def run_level(base: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    ttfts, itls, tokens = [], [], 0

    async def one(prompt: str):
        nonlocal tokens
        async with gate:
            start = time.perf_counter()
            last = None
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True},
                                                     stream_options={"include_usage": True})
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].text:
                    if last is None:
                        ttfts.append(now - start)
                    else:
                        itls.append(now - last)
                    last = now
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    elapsed = time.perf_counter() - start
    return {"rps": len(prompts) / elapsed, "tps": tokens / elapsed, "ttft": ttfts, "itl": itls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=64)
    args = parser.parse_args()
    prompts = [f"Tell me something interesting about the number {i}." for i in range(args.num_prompts)]
    proc, base = start_server(args.model, 32)
    results = {}
    try:
        for level in (1, 8, 32):
            batch = prompts[: max(level * 2, 8)] if level < 32 else prompts
            results[level] = asyncio.run(run_level(base, args.model, batch, level, args.max_tokens))
            r = results[level]
            print(f"concurrency {level:>2}: {r['rps']:6.2f} req/s  {r['tps']:7.1f} output tok/s  "
                  f"TTFT p50 {1e3 * percentile(r['ttft'], .5):7.1f} ms p99 {1e3 * percentile(r['ttft'], .99):7.1f} ms  "
                  f"ITL p50 {1e3 * percentile(r['itl'], .5):6.1f} ms p99 {1e3 * percentile(r['itl'], .99):6.1f} ms",
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    from fp8lm import LLM, SamplingParams

    llm = LLM(args.model, max_model_len=1024, max_num_seqs=32)
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True),
                        use_tqdm=False)
    offline = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
    ratio = results[32]["tps"] / offline
    print(f"offline LLM.generate, same {len(prompts)} prompts: {offline:.1f} output tok/s; server at concurrency 32 "
          f"reaches {ratio:.2f}x of it (target >= 0.85x); mean ITL at 32: "
          f"{1e3 * statistics.mean(results[32]['itl']):.1f} ms")


if __name__ == "__main__":
    main()
