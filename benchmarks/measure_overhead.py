"""Cost of MEASURE mode: the same batch through SmolLM2 with and without observers, in one run.
Target (issue #4): measuring costs at most 1.3x an unmeasured pass."""
import argparse
import tempfile

import torch

from fp8lm import LLM, SamplingParams
from fp8lm.eval.throughput import best_seconds
from fp8lm.quant.dataset import load_samples


def timed(llm, prompts, params, repeats):
    return best_seconds(lambda: llm.generate(prompts, params, use_tqdm=False), repeats, warmup=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [s for s in load_samples("builtin") if isinstance(s, str)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    plain = LLM(args.model, max_model_len=1024, max_num_seqs=32)
    t_plain = timed(plain, prompts, params, args.repeats)
    del plain
    with tempfile.TemporaryDirectory() as tmp:
        measured = LLM(args.model, max_model_len=1024, max_num_seqs=32, quantization="inc",
                       quant_config={"mode": "MEASURE", "dump_stats_path": f"{tmp}/m"})
        t_measure = timed(measured, prompts, params, args.repeats)
        measured.engine.discard_measurement()
    print(f"{len(prompts)} prompts, {args.max_tokens} tokens each: unmeasured {t_plain:.2f} s, "
          f"measured {t_measure:.2f} s, ratio {t_measure / t_plain:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
