"""Load generator for `fp8lm serve`: concurrency 1, 8, 32 over streaming completions, reporting
requests/s, output tokens/s, TTFT and inter-token latency p50/p99; then the same prompts through
offline `LLM.generate` in this process (after the server stops, so they never share the CPUs).
Target (issue #6): at concurrency 32 the server's output tokens/s is within 15% of offline.

Workloads of issue #14, each side by side in one run (two servers, one after the other):
  --workload shared-prefix: 32 requests sharing a 1,500-token system prompt, TTFT with and without
      prefix caching;
  --workload long-prompt: 4 streams running while a 4,000-token prompt arrives, their ITL p99 with
      and without chunked prefill.

    python benchmarks/serve.py [--model smollm2-135m-instruct] [--max-tokens 64] [--workload levels]
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


def start_server(model: str, max_seqs: int, *extra: str, max_model_len: int = 1024) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fp8lm", "serve", model, "--port", str(port), "--max-model-len",
                             str(max_model_len), "--max-num-seqs", str(max_seqs), *extra], stdout=subprocess.DEVNULL,
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


def served(model: str, extra: tuple[str, ...], work) -> dict:
    proc, base = start_server(model, 32, *extra, max_model_len=8192)
    try:
        return asyncio.run(work(base))
    finally:
        proc.terminate()
        proc.wait(30)


def shared_prefix(args) -> None:
    from fp8lm.entrypoints.llm import LLM

    tok = LLM(args.model, max_model_len=64, skip_warmup=True).get_tokenizer()
    text = open(os.path.join(os.path.dirname(__file__), "..", "fp8lm", "data", "heldout.txt")).read()
    system = tok.decode(tok.encode(text)[:1500])
    prompts = [f"{system}\nQuestion {i}: what is this text about?" for i in range(32)]
    for label, extra in (("prefix caching on ", ()), ("prefix caching off", ("--no-enable-prefix-caching",))):
        r = served(args.model, extra, lambda base: run_level(base, args.model, prompts, 8, args.max_tokens))
        print(f"shared 1,500-token prefix, 32 requests at concurrency 8, {label}: TTFT p50 "
              f"{1e3 * percentile(r['ttft'], .5):7.1f} ms p99 {1e3 * percentile(r['ttft'], .99):7.1f} ms, "
              f"{r['tps']:6.1f} output tok/s", flush=True)


def long_prompt(args) -> None:
    import random

    words = " ".join(random.Random(0).choice(["alpha", "beta", "gamma", "delta", "omega"]) for _ in range(4000))

    async def work(base):
        streams = asyncio.gather(*(run_level(base, args.model, [f"Story {i}:"], 1, 256) for i in range(4)))
        await asyncio.sleep(3)
        long = await run_level(base, args.model, [words], 1, 1)
        got = await streams
        return {"itl": [x for r in got for x in r["itl"]], "ttft": long["ttft"]}

    for label, extra in (("chunked prefill on ", ()), ("chunked prefill off", ("--no-enable-chunked-prefill",))):
        r = served(args.model, extra, work)
        print(f"4 streams + one ~4,000-token prompt, {label}: stream ITL p50 {1e3 * percentile(r['itl'], .5):6.1f} ms "
              f"p99 {1e3 * percentile(r['itl'], .99):7.1f} ms max {1e3 * max(r['itl']):7.1f} ms; long prompt TTFT "
              f"{1e3 * r['ttft'][0]:7.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--workload", choices=["levels", "shared-prefix", "long-prompt"], default="levels")
    args = parser.parse_args()
    if args.workload != "levels":
        return (shared_prefix if args.workload == "shared-prefix" else long_prompt)(args)
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
