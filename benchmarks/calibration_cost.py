"""What `fp8lm calibrate` costs against the inference it needs, side by side in one run (issue #31).

The reference is what a calibration cannot do without: the engine generating the fp8lm recipe's
continuation of the calibration prompts (the same sampling parameters, batched, no hooks) and one
prefill of the finished text. Then `calibrate()` with the CLI's defaults, then the reference again:
this host's speed drifts by 10-20% within minutes, so the ratio is taken against the mean of the two
reference runs around the calibration (each one printed). Target: <= 1.5x.
"""
import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from fp8lm import LLM, SamplingParams
from fp8lm.entrypoints.calibrate import STATISTICS_TOKENS, calibrate, continuation_params, tokenize_samples
from fp8lm.model.registry import resolve_model
from fp8lm.quant.dataset import load_samples


def reference_seconds(model: str, max_seq_len: int, max_tokens: int, batch_size: int) -> tuple[float, float, int]:
    engine = dict(max_model_len=max_seq_len + max_tokens, max_num_seqs=batch_size, skip_warmup=True)
    llm = LLM(model, **engine)
    prompts, _ = tokenize_samples(resolve_model(model), load_samples("builtin", 512), max_seq_len)
    params = continuation_params(prompts, STATISTICS_TOKENS, max_tokens, max_seq_len + max_tokens)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    generate = time.perf_counter() - start
    texts = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outputs)]
    del llm
    llm = LLM(model, enable_prefix_caching=False, **engine)    # a cache would hold the generated text's blocks
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": t} for t in texts], SamplingParams(temperature=0, max_tokens=1),
                 use_tqdm=False)
    return generate, time.perf_counter() - start, sum(map(len, texts))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-seq-len", type=int, default=1024)     # the CLI's defaults
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--log", action="store_true", help="calibrate's log lines, timed (where the time goes)")
    args = parser.parse_args()
    if args.log:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    references = [reference(args)]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        calibrate(args.model, "builtin", Path(tmp), max_seq_len=args.max_seq_len, max_tokens=args.max_tokens,
                  batch_size=args.batch_size, use_tqdm=False)
        seconds = time.perf_counter() - start
    print(f"fp8lm calibrate (default flags): {seconds:.1f} s", flush=True)
    references.append(reference(args))
    mean = sum(references) / len(references)
    print(f"fp8lm calibrate: {seconds:.1f} s = {seconds / mean:.2f}x the mean reference {mean:.1f} s "
          f"({seconds / references[0]:.2f}x the one before, {seconds / references[1]:.2f}x the one after; "
          f"target <= 1.5x)")


def reference(args) -> float:
    generate, prefill, tokens = reference_seconds(args.model, args.max_seq_len, args.max_tokens, args.batch_size)
    print(f"reference: generate {generate:.1f} s + prefill {prefill:.1f} s = {generate + prefill:.1f} s "
          f"({tokens} tokens)", flush=True)
    return generate + prefill


if __name__ == "__main__":
    main()
