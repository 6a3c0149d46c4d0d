"""Mask cost per token of the two grammar engines the issue names (xgrammar, llguidance), on this CPU:
the SmolLM2 tokenizer, one JSON schema, one valid answer replayed token by token. Prints the
median microseconds per token (mask computed + token accepted) and the grammar compile time.

    .venv/bin/python benchmarks/grammar_mask.py
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


def main() -> None:
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
