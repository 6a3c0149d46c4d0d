"""FP8 accuracy on SmolLM2, every recipe in one run: the same calibration samples, the same held-out
text, the same float32 reference.

    .venv/bin/python benchmarks/accuracy.py [--num-samples 32] [--chart docs/accuracy_sqnr]

Rows: INC's maxabs_hw recipe, fp8lm's default recipe and each of its parts switched off, the
Linear-only recipes, and llm-compressor's FP8, FP8_DYNAMIC and GPTQ FP8 schemes (calibrated in
transformers on the same token ids as fp8lm's statistics pass: the samples with the model's own
continuations; run by fp8lm from the folders they write). Each row: perplexity
change, its two halves (the first and second half of the text's windows: a difference smaller
than their spread is noise), mean KL and top-1 agreement against float32.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fp8lm import LLM
from fp8lm.entrypoints.calibrate import calibrate
from fp8lm.eval.perplexity import Comparison, Perplexity, compare, read_text, token_windows
from fp8lm.model.registry import pull
from fp8lm.quant.recipe import FP8LM_OPTIONS, PLAIN_OPTIONS, fp8lm_recipe, inc_recipe

LLMC = """
import json, sys, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
src, kind, out, prompts = sys.argv[1], sys.argv[2], sys.argv[3], json.load(open(sys.argv[4]))
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
scheme = "FP8_DYNAMIC" if kind == "FP8_DYNAMIC" else "FP8"
modifier = GPTQModifier if kind == "GPTQ_FP8" else QuantizationModifier
recipe = modifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
ds = Dataset.from_dict({"input_ids": prompts, "attention_mask": [[1] * len(p) for p in prompts]})
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=max(map(len, prompts)),
        num_calibration_samples=len(prompts))
model.save_pretrained(out, save_compressed=True)
"""
LINEAR_ONLY = ["Matmul", "Softmax", "KVCache"]


def fp8lm_cases(prefix: Path) -> dict[str, tuple[dict, bool]]:
    """name -> (QUANT_CONFIG, FP8 KV cache)."""
    default = fp8lm_recipe(prefix)
    cases = {"INC maxabs_hw (everything FP8, FP8 KV)": (inc_recipe(prefix), True),
             "fp8lm default (LM head kept, FP8 attention + KV)": (default, True)}
    flipped = {"rounded_weights": True, "searched_scales": True, "k_smoothing": True, "softmax_scale": "bound",
               "attention_scales_from_cache": True, "lm_head_bfloat16": True, "per_head_attention_scales": True,
               "exact_first_token": True}
    for key, value in FP8LM_OPTIONS.items():
        other = PLAIN_OPTIONS[key] if value == flipped[key] else flipped[key]
        cases[f"  default, {key}={other}"] = ({**default, "fp8lm": {**default["fp8lm"], key: other}}, True)
    cases["  default with plain exact scales only"] = ({**default, "fp8lm": PLAIN_OPTIONS}, True)
    cases["  default with the LM head in FP8"] = ({**default, "blocklist": {"types": [], "names": []}}, True)
    # each attention part on its own (everything else high precision), with the recipe's options
    for part, blocked in (("q·k", {"types": ["Linear", "Softmax", "KVCache"], "names": ["matmul_av"]}),
                          ("softmax", {"types": ["Linear", "Matmul", "KVCache"], "names": []}),
                          ("p·v", {"types": ["Linear", "Softmax", "KVCache"], "names": ["matmul_qk"]}),
                          ("KV cache", {"types": ["Linear", "Matmul", "Softmax"], "names": []})):
        cases[f"  only {part} in FP8 (recipe)"] = ({**default, "blocklist": blocked}, part == "KV cache")
    linear = {"types": LINEAR_ONLY, "names": ["^lm_head$"]}
    cases["fp8lm Linear only (recipe)"] = ({**default, "blocklist": linear}, False)
    cases["fp8lm Linear only, plain exact scales"] = ({**default, "blocklist": linear, "fp8lm": PLAIN_OPTIONS}, False)
    return cases


def llmc_folder(model: str, kind: str, out: Path, prompts: list[list[int]]) -> Path:
    data = out.with_suffix(".json")
    data.write_text(json.dumps(prompts))
    r = subprocess.run([sys.executable, "-c", LLMC, model, kind, str(out), str(data)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llm-compressor {kind} failed:\n{r.stderr[-3000:]}")
    for name in Path(model).iterdir():
        if name.name.startswith("tokenizer") or name.name in ("special_tokens_map.json", "generation_config.json"):
            (out / name.name).write_bytes(name.read_bytes())
    return out


def merged(a: Comparison, b: Comparison) -> Comparison:
    return Comparison(Perplexity(a.reference.nll + b.reference.nll, a.reference.num_tokens + b.reference.num_tokens),
                      Perplexity(a.candidate.nll + b.candidate.nll, a.candidate.num_tokens + b.candidate.num_tokens),
                      a.kl_sum + b.kl_sum, a.agree + b.agree, a.nll_diff_sq + b.nll_diff_sq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chart", default=None, help="path prefix for the default recipe's per-module SQNR table + PNG")
    ap.add_argument("--skip-llmcompressor", action="store_true")
    args = ap.parse_args()
    model = str(pull("smollm2-135m-instruct"))
    work = Path(tempfile.mkdtemp(prefix="fp8lm-accuracy-"))
    start = time.perf_counter()
    # searched_scales on only so that the statistics hold the searched factors its row needs
    cal = calibrate(model, "builtin", work / "cal", num_samples=args.num_samples, dtype=args.dtype, use_tqdm=False,
                    quant_overrides={"fp8lm": {**FP8LM_OPTIONS, "searched_scales": True}})
    print(f"calibrated on {cal.num_samples} samples ({sum(map(len, cal.texts))} tokens with the model's continuations) "
          f"in {time.perf_counter() - start:.0f} s", flush=True)
    common = dict(dtype=args.dtype, max_model_len=args.window, max_num_seqs=1, skip_warmup=True,
                  num_kv_blocks=-(-args.window // 16))
    ref = LLM(model, **common)
    windows = token_windows(ref.get_tokenizer(), read_text(None), args.window)
    halves = (windows[:len(windows) // 2], windows[len(windows) // 2:])
    print(f"held-out text: {sum(len(w) - 1 for w in windows)} scored tokens in {len(windows)} windows of "
          f"{args.window}; dtype {args.dtype}\n")
    print("| recipe | ppl change | halves | mean KL | top-1 |\n|---|---|---|---|---|")

    def row(name: str, llm: LLM) -> None:
        a, b = (compare(ref.engine, llm.engine, h) for h in halves)
        r = merged(a, b)
        print(f"| {name} | {r.ppl_change_pct:+.2f}% | {a.ppl_change_pct:+.2f}% / {b.ppl_change_pct:+.2f}% | "
              f"{r.mean_kl:.4f} | {100 * r.top1_agreement:.1f}% |", flush=True)

    for name, (config, kv) in fp8lm_cases(work / "cal" / "inc_output").items():
        llm = LLM(model, quantization="inc", quant_config=config, kv_cache_dtype="fp8_inc" if kv else "auto", **common)
        row(name, llm)
        if args.chart and name.startswith("fp8lm default"):
            from fp8lm.eval.report import module_sqnr, write_sqnr_report
            print(f"<!-- chart: {write_sqnr_report(module_sqnr(ref.engine, llm.engine, windows), args.chart)} -->")
        del llm
    if not args.skip_llmcompressor:
        for kind in ("FP8", "FP8_DYNAMIC", "GPTQ_FP8"):
            folder = llmc_folder(model, kind, work / f"llmc-{kind}", cal.texts)
            row(f"llm-compressor {kind} (Linear only, LM head kept)", LLM(str(folder), **common))
    print(f"\n(total {time.perf_counter() - start:.0f} s; files in {work})")


if __name__ == "__main__":
    main()
