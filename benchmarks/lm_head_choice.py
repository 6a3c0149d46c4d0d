"""The LM head kept (the recipe's bfloat16 values) vs in FP8, side by side on one calibration: held-out
perplexity change, mean KL and top-1 agreement against float32, and greedy decode tokens/s at batch
1 and 16 (FP8 KV cache both). For models whose vocabulary makes the head most of the bytes (Gemma 3:
262k x 640 of its 268M parameters).

    python benchmarks/lm_head_choice.py --model gemma3-270m --quant-config CAL/maxabs_quant_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch


def main() -> None:
    from fp8lm import LLM
    from fp8lm.eval.perplexity import compare, read_text, token_windows
    from fp8lm.eval.throughput import make_prompts, run_fp8lm
    from fp8lm.quant.bfloat16_format import BF16Panels

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--quant-config", required=True, help="fp8lm calibrate's QUANTIZE config (LM head kept)")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    kept = Path(args.quant_config)
    config = json.loads(kept.read_text())
    config["blocklist"] = {"types": [], "names": []}
    fp8_head = Path(tempfile.mkdtemp(prefix="lm-head-fp8-")) / "quant_config.json"
    fp8_head.write_text(json.dumps(config))

    print(f"machine: {platform.machine()}, torch threads {torch.get_num_threads()}; model {args.model}")
    reference = LLM(args.model, max_model_len=1024, skip_warmup=True)
    windows = token_windows(reference.get_tokenizer(), read_text(None), 512)
    rows = {}
    for label, path in (("LM head kept (bfloat16 values)", kept), ("LM head FP8", fp8_head)):
        llm = LLM(args.model, max_model_len=1024, max_num_seqs=16, quantization="inc", quant_config=str(path),
                  kv_cache_dtype="fp8_inc")
        head = llm.engine.host.model.lm_head
        # what a decode step reads: the kernels' panels (bfloat16 for the kept head, FP8 otherwise)
        packed = head.format.panels if isinstance(head.format, BF16Panels) else head.format.packed
        head_bytes = packed.numel() * packed.element_size()
        prompts = make_prompts(llm.engine.tokenizer, 16)
        run_fp8lm(llm, prompts[:1], 4)
        speed = {n: (lambda t, k: k / t)(*run_fp8lm(llm, prompts[:n], args.tokens)) for n in (1, 16)}
        rows[label] = (compare(reference.engine, llm.engine, windows).summary(), speed, head_bytes,
                       head.format.describe())
        llm.engine.shutdown()
    for label, (summary, speed, head_bytes, fmt) in rows.items():
        print(f"\n{label} [{fmt}; {head_bytes / 2**20:.0f} MiB of panels read per step]:\n  {summary}\n"
              f"  decode: batch 1 {speed[1]:.1f} tok/s, batch 16 {speed[16]:.1f} tok/s")
    (k1, k16), (f1, f16) = ([r[1][1], r[1][16]] for r in rows.values())
    print(f"\nFP8 head / kept head decode speed: batch 1 {f1 / k1:.2f}x, batch 16 {f16 / k16:.2f}x")


if __name__ == "__main__":
    main()
