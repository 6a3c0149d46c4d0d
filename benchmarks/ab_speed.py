"""Prefill and decode speed of this checkout against another revision, side by side: each revision
runs in a fresh process (its own git worktree for the other one), alternating, so that a noisy host
slows both alike. For refactors that must not change speed.

    python benchmarks/ab_speed.py --base REV --quant-config cal/maxabs_quant_cpu.json [--rounds 3]

Prints tokens/s per revision and workload (best of the rounds) and the ratio this/base.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEASURE = r"""
import json, sys, time
from fp8lm import LLM, SamplingParams
from fp8lm.eval.perplexity import read_text, token_windows
kw = json.loads(sys.argv[1])
llm = LLM("smollm2-135m-instruct", max_model_len=1024, max_num_seqs=16, kv_cache_memory="256MiB", **kw)
window = token_windows(llm.get_tokenizer(), read_text(None), 512)[0]
out = {}
start = time.perf_counter(); llm.engine.score(window); out["prefill 512"] = 512 / (time.perf_counter() - start)
params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
for batch in (1, 16):
    prompts = [f"Question {i}: describe the number {i}." for i in range(batch)]
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    out[f"decode batch {batch}"] = batch * 64 / (time.perf_counter() - start)
print(json.dumps(out))
"""


def run(repo: Path, kwargs: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(kwargs)], cwd=repo, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the git revision to compare with")
    p.add_argument("--quant-config", required=True, help="a QUANTIZE config for SmolLM2 (fp8lm calibrate)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    configs = {"FP8 (fp8_inc KV)": {"quantization": "inc", "quant_config": str(Path(args.quant_config).resolve()),
                                    "kv_cache_dtype": "fp8_inc"},
               "float32": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            best: dict = {}
            for r in range(args.rounds):
                for label, repo in (("this", ROOT), ("base", base)) if r % 2 == 0 else (("base", base), ("this", ROOT)):
                    for name, kwargs in configs.items():
                        for workload, value in run(repo, kwargs).items():
                            key = (name, workload, label)
                            best[key] = max(best.get(key, 0.0), value)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=True)
    print(f"{'config':18s} {'workload':16s} {'this tok/s':>11s} {'base tok/s':>11s} {'this/base':>9s}")
    for name in configs:
        for workload in ("prefill 512", "decode batch 1", "decode batch 16"):
            this, other = best[(name, workload, "this")], best[(name, workload, "base")]
            print(f"{name:18s} {workload:16s} {this:11.1f} {other:11.1f} {this / other:9.3f}")


if __name__ == "__main__":
    main()
