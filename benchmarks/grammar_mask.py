"""Structured outputs on this CPU, in two parts.

1. Mask cost per token of the two grammar engines considered (xgrammar, llguidance): the SmolLM2
   tokenizer, one JSON schema, one valid answer replayed token by token (mask computed + token
   accepted), and each engine's set-up and compile time.
2. fp8lm's decode with a JSON-schema constraint against free decoding, same prompts, batch 1 and
   batch 32, side by side in one run: milliseconds per generated token and the ratio.

    .venv/bin/python benchmarks/grammar_mask.py [--skip-engines] [--skip-decode]
"""
from __future__ import annotations

import json
import statistics
import time

from fp8lm.engine.structured_outputs import byte_level_spec

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"]}},
    "required": ["name", "age", "tags", "address"]}
ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines", "poetry"],
                     "address": {"city": "London", "zip": "W1"}})


def per_token_us(step, tokens) -> tuple[float, float, float]:
    """Median, mean and worst microseconds per token."""
    times = []
    for t in tokens:
        start = time.perf_counter()
        step(t)
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times), statistics.fmean(times), max(times)


def llguidance_run(hf, tokens, vocab):
    import llguidance
    import llguidance.torch

    start = time.perf_counter()
    lltok = llguidance.LLTokenizer(byte_level_spec(hf), n_vocab=vocab, eos_token=hf.eos_token_id)
    tok_s = time.perf_counter() - start
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    compile_s = time.perf_counter() - start
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def step(t):
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        if not matcher.consume_token(t):
            raise RuntimeError(matcher.get_error())
    return tok_s, compile_s, per_token_us(step, tokens)


def xgrammar_run(hf, tokens, vocab):
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info)
    tok_s = time.perf_counter() - start
    start = time.perf_counter()
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - start
    mask = xgr.allocate_token_bitmask(1, vocab)

    def step(t):
        matcher.fill_next_token_bitmask(mask)
        if not matcher.accept_token(t):
            raise RuntimeError("xgrammar rejected a valid token")
    return tok_s, compile_s, per_token_us(step, tokens)


def byte_level_tokenizer(hf):
    """The same tokenizer with the plain ByteLevel decoder both engines recognise."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(byte_level_spec(hf)),
                                   eos_token=hf.eos_token)


# Long enough to keep a batch decoding for the whole run (so the two sides time the same kind of steps).
LONG_SCHEMA = {"type": "object", "properties": {"facts": {"type": "array", "items": {"type": "string", "maxLength": 40},
                                                          "minItems": 30, "maxItems": 30}},
               "required": ["facts"], "additionalProperties": False}


def decode_overhead(batch: int, max_tokens: int = 96, repeats: int = 2) -> None:
    """End to end (best of `repeats`, the two sides alternating), and the time spent in the
    sampler's grammar masking itself (every call timed)."""
    from fp8lm import LLM, SamplingParams
    from fp8lm.engine import sampler
    from fp8lm.engine.sampling_params import StructuredOutputsParams

    mask_seconds = []
    untimed = sampler.mask_disallowed

    def timed(*args):
        start = time.perf_counter()
        result = untimed(*args)
        mask_seconds.append(time.perf_counter() - start)
        return result
    sampler.mask_disallowed = timed

    llm = LLM("smollm2-135m-instruct", max_model_len=1024, max_num_seqs=batch)
    chats = [[{"role": "user", "content": f"List facts about the number {i} as JSON."}] for i in range(batch)]
    constrained = SamplingParams(temperature=0, max_tokens=max_tokens,
                                 structured_outputs=StructuredOutputsParams(json=LONG_SCHEMA))
    free = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.chat(chats[:1], constrained, use_tqdm=False)           # builds the grammar backend (once per engine)
    best = {"free": float("inf"), "json_schema": float("inf")}
    for _ in range(repeats):
        for name, params in (("free", free), ("json_schema", constrained)):
            mask_seconds.clear()
            start = time.perf_counter()
            outs = llm.chat(chats, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            best[name] = min(best[name], seconds / tokens * batch * 1e3)   # ms per decode step
            if name == "json_schema":
                masked = sum(mask_seconds) / len(mask_seconds) * 1e3
    print(f"batch {batch:2d}: free {best['free']:.2f} ms/step, json_schema {best['json_schema']:.2f} ms/step "
          f"(ratio {best['json_schema'] / best['free']:.3f}); grammar masks {masked:.3f} ms/step "
          f"= {masked / best['free'] * 100:.1f}% of a free step, {masked / batch * 1e3:.0f} us per sequence-token")
    sampler.mask_disallowed = untimed


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    if not args.skip_engines:
        compare_engines()
    if not args.skip_decode:
        for batch in (1, 32):
            decode_overhead(batch)


def compare_engines() -> None:
    from transformers import AutoTokenizer

    from fp8lm.model.config import ModelConfig
    from fp8lm.model.registry import resolve_model

    folder = resolve_model("smollm2-135m-instruct")
    hf = byte_level_tokenizer(AutoTokenizer.from_pretrained(str(folder)))
    vocab = ModelConfig.from_folder(folder).vocab_size
    tokens = hf.encode(ANSWER, add_special_tokens=False)
    print(f"SmolLM2 tokenizer, vocab {vocab}; answer of {len(tokens)} tokens")
    for name, run in (("llguidance", llguidance_run), ("xgrammar", xgrammar_run)):
        tok_s, compile_s, (median, mean, worst) = run(hf, tokens, vocab)
        print(f"{name:10s}: tokenizer setup {tok_s * 1e3:7.1f} ms, schema compile {compile_s * 1e3:6.1f} ms, "
              f"mask + accept per token: median {median:6.1f} us, mean {mean:6.1f} us, worst {worst:7.1f} us")


if __name__ == "__main__":
    main()
