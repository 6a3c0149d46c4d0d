"""Throughput benchmark: the same prompts through fp8lm and through transformers' `generate`, in one
run, with the ratio and the batch-1 memory-bandwidth roofline."""
from __future__ import annotations

import argparse
import platform
import time

import torch

QUESTIONS = [
    "Explain how a refrigerator works.", "Write a short poem about autumn.", "What is a prime number?",
    "Summarize the plot of Romeo and Juliet.", "How do vaccines train the immune system?",
    "Give three tips for learning a new language.", "What causes the seasons on Earth?",
    "Describe the water cycle.", "Write a Python function that reverses a string.",
    "Why do cats purr?", "What is the difference between weather and climate?",
    "How does a bicycle stay upright?", "Explain recursion to a child.", "What is photosynthesis?",
    "List the planets of the solar system.", "How do airplanes fly?",
]


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    texts = [QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" (variant {i})") for i in range(n)]
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False)
            for t in texts]


def best_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """The fastest of `repeats` timed calls of fn, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth_gbs(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-N time of summing a buffer much larger than the caches."""
    x = torch.ones(num_bytes // 4)
    return num_bytes / best_seconds(x.sum, repeats, warmup=0) / 1e9


def decode_bytes_per_token(model) -> int:
    """Weights read for one decode step: every matrix multiplied (the embedding lookup reads one row)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or name.endswith("embed_tokens.weight"):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total + model.lm_head.weight.numel() * model.lm_head.weight.element_size() * (
        1 if id(model.lm_head.weight) not in seen else 0)


def run_fp8lm(llm, prompts, max_tokens: int) -> tuple[float, int]:
    from fp8lm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def run_transformers(hf, pad_id: int, prompts, max_tokens: int) -> tuple[float, int]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          do_sample=False, pad_token_id=pad_id)
    elapsed = time.perf_counter() - start
    return elapsed, (out.shape[1] - width) * len(prompts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="fp8lm's ranks (gloo on the CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from fp8lm import LLM

    llm = LLM(args.model, dtype="float32", device="cpu", max_num_seqs=args.num_prompts, max_model_len=1024,
              tensor_parallel_size=args.tensor_parallel_size)
    tok = llm.engine.tokenizer
    prompts = make_prompts(tok, args.num_prompts)
    hf = None if args.skip_transformers else AutoModelForCausalLM.from_pretrained(
        llm.engine.host.model_path, dtype=torch.float32).eval()
    pad = tok.hf.pad_token_id if tok.hf.pad_token_id is not None else 0
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; model {llm.engine.host.model_path.name}, float32, "
          f"tensor_parallel_size {args.tensor_parallel_size}")
    rows = []
    for label, batch in ((f"{args.num_prompts} prompts x {args.max_tokens} tokens", prompts), ("batch-1 decode", prompts[:1])):
        t_ours, n_ours = run_fp8lm(llm, batch, args.max_tokens)
        ours = n_ours / t_ours
        line = f"{label:28s} fp8lm {ours:8.1f} tok/s"
        if hf is not None:
            t_hf, n_hf = run_transformers(hf, pad, batch, args.max_tokens)
            line += f"   transformers {n_hf / t_hf:8.1f} tok/s   ratio {ours / (n_hf / t_hf):5.2f}x"
        rows.append((label, ours))
        print(line, flush=True)
    bw = read_bandwidth_gbs()
    per_token = decode_bytes_per_token(llm.engine.host.model)
    roofline = bw * 1e9 / per_token
    print(f"roofline: {per_token / 1e6:.0f} MB of weights per decode step, read bandwidth {bw:.1f} GB/s "
          f"-> {roofline:.0f} tok/s; batch-1 reaches {rows[-1][1] / roofline:.0%} of it")
    llm.engine.shutdown()


if __name__ == "__main__":
    main()
