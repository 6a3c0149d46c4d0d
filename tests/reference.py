"""Helpers that run fp8lm's model directly (no engine) for comparisons against transformers."""
from __future__ import annotations

import torch

from fp8lm.model.attention import AttentionMetadata, build_attn_bias


def full_logits(model, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits for every position of one sequence: one prefill over a private paged cache."""
    n = len(token_ids)
    num_blocks = -(-n // block_size)
    for attn in model.attention_layers():
        shape = (attn.num_kv_heads, num_blocks, block_size, attn.head_dim)
        attn.bind_cache(torch.zeros(shape), torch.zeros(shape))
    model.model.build_rope_caches(max(n, 2), torch.device("cpu"), torch.float32)
    pos = torch.arange(n)
    padded = num_blocks * block_size
    def metadata(window=None):
        return AttentionMetadata(
            slot_mapping=pos, block_tables=torch.arange(num_blocks)[None], max_context_len=padded,
            query_index=pos[None], flat_index=pos,
            attn_bias=build_attn_bias(pos[None], torch.tensor([n]), padded, torch.float32, window))
    meta = metadata()
    meta.windows = {w: metadata(w) for w in set(model.config.layer_windows) - {None}}
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(token_ids), pos, meta))


def assert_near_ties_only(llm, prompt: str, tokens: list[int], near_tie: float, max_ties: int,
                          masked_ids: tuple[int, ...] = ()) -> int:
    """`tokens` (greedy output of another FP8 implementation), teacher-forced through `llm`: each one
    must be llm's own argmax (`masked_ids` excluded) or within `near_tie` nats of it, at most
    `max_ties` times. Two FP8 implementations whose float32 sums differ only in order can part where
    an activation sits on an FP8 rounding boundary; this tells such near ties from real
    disagreements. Returns the ties."""
    ids = llm.get_tokenizer().encode(prompt)
    logits = llm.engine.score(ids + list(tokens))[len(ids) - 1:]
    return assert_ties_in_logits(logits, tokens, near_tie, max_ties, masked_ids, repr(prompt))


def assert_ties_in_logits(logits: torch.Tensor, tokens: list[int], near_tie: float, max_ties: int,
                          masked_ids=(), label: str = "") -> int:
    """assert_near_ties_only's check on given logits [len(tokens), vocab], row i predicting tokens[i]."""
    logits = logits.clone()
    logits[:, list(masked_ids)] = float("-inf")
    ties = 0
    for step, token in enumerate(tokens):
        best = int(logits[step].argmax())
        if best != token:
            ties += 1
            gap = float(logits[step, best] - logits[step, token])
            assert gap < near_tie, f"{label} step {step}: {token} is {gap:.2f} nats below the argmax {best}"
    assert ties <= max_ties, f"{label}: {ties} near ties (allowed {max_ties})"
    return ties
