"""The whole-decoder decode step (quant/fused_decode.FusedDecodeStack) against the same model's
layer-by-layer decode, in one process, alternating: SmolLM2 unquantized (float32, bfloat16) or FP8
(`--quant-config`, e.g. the calibration serve_vs_vllm.py caches), random prompts, greedy tokens.

    python benchmarks/decode_stack.py [--dtypes float32,bfloat16] [--quant-config FILE]
        [--batches 1,16] [--prompt-tokens 256] [--max-tokens 64] [--rounds 2]

Prints output tok/s (the prompt step included) per round and the stack / layers ratio of the last round.
"""
from __future__ import annotations

import argparse
import time

import torch

from fp8lm import LLM, SamplingParams
from fp8lm.model.registry import pull


def tokens_per_second(llm: LLM, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return len(prompts) * max_tokens / (time.perf_counter() - start)


def run(name: str, llm: LLM, args) -> None:
    model = llm.engine.host.model.model
    stack = model.fused_decode
    if stack is None:
        print(f"{name}: no fused decode step (the log says why)")
        return
    g = torch.Generator().manual_seed(0)
    prompts = [[int(t) for t in torch.randint(100, 40000, (args.prompt_tokens,), generator=g)]
               for _ in range(max(args.batches))]
    for r in range(args.rounds):
        rates = {}
        for path in ("layers", "stack"):
            model.fused_decode = stack if path == "stack" else None
            for b in args.batches:
                rates[path, b] = tokens_per_second(llm, prompts[:b], args.max_tokens)
                print(f"{name} round {r} {path:6s} batch {b:2d}: {rates[path, b]:7.1f} output tok/s", flush=True)
    model.fused_decode = stack
    for b in args.batches:
        print(f"{name} batch {b:2d}: stack / layers {rates['stack', b] / rates['layers', b]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--quant-config", help="also an FP8 model of this QUANT_CONFIG (float32, FP8 KV cache)")
    parser.add_argument("--batches", default="1,16", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    path = str(pull(args.model))
    common = dict(skip_warmup=True, max_model_len=args.prompt_tokens + args.max_tokens + 16,
                  max_num_seqs=max(args.batches))
    for dtype in filter(None, args.dtypes.split(",")):
        run(dtype, LLM(path, dtype=dtype, **common), args)
    if args.quant_config:
        run("fp8", LLM(path, quantization="inc", quant_config=args.quant_config, kv_cache_dtype="fp8_inc", **common),
            args)


if __name__ == "__main__":
    main()
