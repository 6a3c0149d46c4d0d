"""Held-out quality of `fp8lm calibrate` (default flags, fp8lm's recipe) per continuation seed: how
much the FP8 model moves when only the sampled calibration text changes. That spread is the noise
against which a change to calibration itself is judged (issue #31).

    .venv/bin/python benchmarks/calibration_seeds.py --seeds 0 1000
    PYTHONPATH=<checkout of another commit> .venv/bin/python benchmarks/calibration_seeds.py --seeds 0

Seed k samples prompt i's continuation with seed k + i (k = 0 is what calibrate does).
"""
import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from fp8lm import LLM
from fp8lm.entrypoints import calibrate as calibration
from fp8lm.eval.perplexity import compare, read_text, token_windows
from fp8lm.model.registry import pull


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1000])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--statistics-tokens", type=int, default=None, help="calibrate's (default: its own)")
    parser.add_argument("--max-seq-len", type=int, default=1024, help="calibrate's (make demo: 512)")
    parser.add_argument("--max-tokens", type=int, default=32, help="calibrate's (make demo: 16)")
    args = parser.parse_args()
    model = str(pull("smollm2-135m-instruct"))
    params_of = calibration.continuation_params
    common = dict(max_model_len=args.window, max_num_seqs=1, skip_warmup=True, num_kv_blocks=-(-args.window // 16))
    reference = LLM(model, **common)
    windows = token_windows(reference.get_tokenizer(), read_text(None), args.window)
    statistics = {} if args.statistics_tokens is None else {"statistics_tokens": args.statistics_tokens}
    print("| seed | calibrate (s) | held-out ppl change | mean KL | top-1 |\n|---|---|---|---|---|")
    for seed in args.seeds:
        calibration.continuation_params = lambda *a, seed=seed, **k: [
            dataclasses.replace(p, seed=p.seed + seed) for p in params_of(*a, **k)]
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = calibration.calibrate(model, "builtin", Path(tmp), use_tqdm=False, max_seq_len=args.max_seq_len,
                                           max_tokens=args.max_tokens, **statistics)
            seconds = time.perf_counter() - start
            fp8 = LLM(model, quantization="inc", quant_config=str(result.quant_config), kv_cache_dtype="fp8_inc",
                      **common)
            r = compare(reference.engine, fp8.engine, windows)
            print(f"| {seed} | {seconds:.0f} | {r.ppl_change_pct:+.2f}% | {r.mean_kl:.4f} | "
                  f"{100 * r.top1_agreement:.1f}% |", flush=True)
            del fp8


if __name__ == "__main__":
    main()
