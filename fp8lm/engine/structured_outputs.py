"""Grammar-constrained decoding (vLLM's structured outputs) with xgrammar: one matcher per
constrained sequence, whose mask of allowed next tokens the sampler applies to that sequence's
row only; unconstrained rows of the batch cost nothing. xgrammar was chosen over llguidance by
benchmarks/grammar_mask.py on this CPU (mask + accept 14 us vs 91 us per token on average, tokenizer
set-up 0.3 s vs 1.9 s; docs/BENCHMARKS.md)."""
from __future__ import annotations

import copy
import json
import re
import threading

import numpy as np
import torch

from fp8lm.engine.sampling_params import SamplingParamsError, StructuredOutputsParams


# Compiled grammars xgrammar keeps for reuse (least recently used evicted beyond this).
GRAMMAR_CACHE_BYTES = 128 << 20


class GrammarBackend:
    """Compiles constraints against one tokenizer and vocabulary (the model's logits width). Built on
    the first constrained request (converting the vocabulary takes a fraction of a second); thread
    safe, so that a server compiles off its engine thread (xgrammar releases the GIL meanwhile)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self._args = (hf_tokenizer, vocab_size, list(eos_token_ids))
        self._compiler = None
        self._lock = threading.Lock()

    @property
    def compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                from tokenizers import Tokenizer
                from transformers import PreTrainedTokenizerFast

                hf_tokenizer, vocab_size, eos = self._args
                byte_level = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(byte_level_spec(hf_tokenizer)))
                info = xgr.TokenizerInfo.from_huggingface(byte_level, vocab_size=vocab_size, stop_token_ids=eos)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
            return self._compiler

    @staticmethod
    def matchers(compiled, n: int) -> list:
        """n independent matchers of one compiled grammar, for one request's sequences."""
        import xgrammar as xgr

        return [xgr.GrammarMatcher(compiled) for _ in range(n)]

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar; a constraint xgrammar rejects is a SamplingParamsError naming it."""
        c = self.compiler
        try:
            if params.json is not None or params.json_object:
                schema = {"type": "object"} if params.json_object else params.json
                return c.compile_json_schema(json.dumps(schema), any_whitespace=False)
            if params.regex is not None:
                return c.compile_regex(params.regex)
            if params.choice is not None:
                return c.compile_grammar("root ::= " + " | ".join(_ebnf_string(x) for x in params.choice))
        except Exception as e:  # xgrammar raises RuntimeError / ValueError subclasses for bad input
            raise SamplingParamsError("structured_outputs", f"invalid constraint: {_first_line(e)}") from None
        try:
            return c.compile_grammar(params.grammar)
        except Exception as ebnf_error:
            try:
                return c.compile_lark(params.grammar)
            except Exception:
                raise SamplingParamsError("structured_outputs", f"invalid grammar (EBNF or Lark): "
                                                                f"{_first_line(ebnf_error)}") from None


def mask_disallowed(logits: torch.Tensor, rows: list[int], matchers: list) -> torch.Tensor:
    """logits with every token the row's matcher disallows set to -inf (a new tensor; the input is
    not modified). The bitmask is unpacked with numpy: 2x faster here than shifts in torch."""
    import xgrammar as xgr

    vocab = logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(len(rows), vocab)
    for i, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(bitmask, i)
    # int32 words are little-endian on every platform torch's CPU builds support: bit b of word w is token 32w + b.
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    allowed = torch.from_numpy(bits.view(np.bool_))
    if len(rows) == logits.shape[0]:
        return torch.where(allowed, logits, float("-inf"))
    logits = logits.clone()
    logits[rows] = torch.where(allowed, logits[rows], float("-inf"))
    return logits


def _ebnf_string(text: str) -> str:
    """A string literal of xgrammar's EBNF: JSON's escapes, which it reads the same way."""
    return json.dumps(text, ensure_ascii=False)


def _first_line(e: Exception) -> str:
    """xgrammar's message without its "[time] source.cc:line:" prefix."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", line)


def byte_level_spec(hf_tokenizer) -> str:
    """The tokenizer as tokenizers' JSON, for the grammar engine. transformers' GGUF import writes
    byte-level BPE decoders as a Sequence ending in ByteLevel (after SentencePiece-style steps that
    never fire on byte-level tokens); xgrammar and llguidance recognise only a plain ByteLevel
    decoder (else they read tokens' bytes wrong), so they get one."""
    backend = copy.copy(hf_tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    spec = json.loads(backend.to_str())
    decoder = spec.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        byte_level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if byte_level:
            spec["decoder"] = byte_level[0]
    return json.dumps(spec)
