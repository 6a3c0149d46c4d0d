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
    model.rotary.build_cache(max(n, 2), torch.device("cpu"), torch.float32)
    pos = torch.arange(n)
    padded = num_blocks * block_size
    meta = AttentionMetadata(
        slot_mapping=pos, block_tables=torch.arange(num_blocks)[None], max_context_len=padded,
        query_index=pos[None], flat_index=pos,
        attn_bias=build_attn_bias(pos[None], torch.tensor([n]), padded, torch.float32))
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(token_ids), pos, meta))
