"""Attention over the paged KV cache, for prefill and decode alike.

Every step writes its new K/V into the cache first and then attends over each sequence's whole
context read back from the cache, so prompts, recomputed (preempted) sequences and decode steps
share one code path. Queries are padded to [batch, max_query_len]; one additive mask per step
(built by the model runner) hides future and padded keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fp8lm.model.layers import KVCache, Matmul, Softmax


@dataclass
class AttentionMetadata:
    """In a decode step (max_query_len == 1) the flat tokens are already in sequence order:
    query_index[:, 0] and flat_index are both arange(batch_size)."""
    slot_mapping: torch.Tensor     # [T] cache slot of each new token
    block_tables: torch.Tensor     # [B, max_blocks] (padding: block 0)
    max_context_len: int           # keys attended per sequence: max_blocks * block_size (padding masked)
    query_index: torch.Tensor      # [B, max_query_len] index of each padded query in the flat tokens
    flat_index: torch.Tensor       # [T] index of each flat token in the padded [B * max_query_len]
    attn_bias: torch.Tensor        # [1, B, 1, max_query_len, max_context_len], 0 or -inf
    # Per sliding window: the same step seen by a windowed layer, each sequence's block table cut
    # to the blocks its queries' windows touch (the others are never read) and the bias to match.
    windows: dict[int, AttentionMetadata] = field(default_factory=dict)

    def for_window(self, window: int | None) -> AttentionMetadata:
        return self if window is None else self.windows[window]

    @property
    def batch_size(self) -> int:
        return self.query_index.shape[0]

    @property
    def max_query_len(self) -> int:
        return self.query_index.shape[1]


@dataclass
class StepMetadata:
    """A step whose flat tokens form consecutive parts attended separately (decodes, then prompt
    chunks), so that short queries are not padded to a long chunk's length."""
    parts: list[AttentionMetadata]


QUERY_BLOCK = 256     # prefill queries attended per block: scores stay [.., 256, context], not [.., L, context]


def build_attn_bias(query_positions: torch.Tensor, context_lens: torch.Tensor, max_context_len: int,
                    dtype: torch.dtype, window: int | None = None, key_start: torch.Tensor | None = None) -> torch.Tensor:
    """query_positions: [B, L] absolute positions (padding: 0); context_lens: [B]. With `window`,
    a query at p sees keys p-window+1..p; `key_start` [B]: the absolute position of key column 0."""
    keys = torch.arange(max_context_len, device=query_positions.device)[None, None, :]
    if key_start is not None:
        keys = keys + key_start[:, None, None]
    allowed = (keys <= query_positions[:, :, None]) & (keys < context_lens[:, None, None])
    if window is not None:
        allowed &= keys > query_positions[:, :, None] - window
    bias = torch.zeros(allowed.shape, dtype=dtype, device=query_positions.device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias[None, :, None]


@dataclass(frozen=True)
class CacheAdjustment:
    """Exact changes to how an attention layer caches K/V, which a quantizer makes where the cache
    rounds (quant/post_load.py builds them; a plain layer has none)."""
    # [kv_heads, head_dim] subtracted from every key before it is cached: each score of a query's
    # row shifts by the same q·offset, which softmax cancels.
    key_offset: torch.Tensor | None = None
    # Each sequence's first token keeps its K/V in the model dtype beside the cache (the layer's
    # `first_kv`: [2, kv_heads, blocks + 1, head_dim], one row per block for the token in its first
    # slot; the last row takes every other token), and its q·k and p·v terms use them.
    exact_first_token: bool = False


class AttentionKernel:
    """What a quantizer may set as `PagedAttention.fused_attention`: the layer's cache writes,
    matmuls and softmax in one call, the same numbers as its modules'. Declared here, built in quant/."""

    def applies(self, attn: PagedAttention, q: torch.Tensor, meta: AttentionMetadata) -> bool:
        raise NotImplementedError

    def __call__(self, attn: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError


class PagedAttention(nn.Module):
    fused_attention: AttentionKernel | None = None

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None = None,
                 scale: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sliding_window = sliding_window
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.matmul_qk = Matmul()
        self.softmax = Softmax()
        self.matmul_av = Matmul()
        self.k_cache = KVCache()
        self.v_cache = KVCache()
        self.k_cache_tensor: torch.Tensor | None = None
        self.v_cache_tensor: torch.Tensor | None = None
        self.adjustment = CacheAdjustment()
        self.first_kv: torch.Tensor | None = None       # bound with the caches where exact_first_token

    @property
    def key_offset(self) -> torch.Tensor | None:
        return self.adjustment.key_offset

    @property
    def exact_first_token(self) -> bool:
        return self.adjustment.exact_first_token

    def cache_dtype(self, compute_dtype: torch.dtype) -> torch.dtype:
        """What this layer's K/V cache stores: FP8 once its KVCache modules are quantized."""
        return self.k_cache.cache_dtype or compute_dtype

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor, first_kv: torch.Tensor | None = None) -> None:
        if self.exact_first_token and first_kv is None:
            raise RuntimeError("exact_first_token: bind_cache needs the first tokens' K/V buffer")
        self.k_cache_tensor, self.v_cache_tensor, self.first_kv = k_cache, v_cache, first_kv

    def keep_first_tokens(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Each new token in a block's first slot: its K/V into first_kv (shapes stay static: the
        others go to the spare last row)."""
        block_size, spare = self.k_cache_tensor.shape[2], self.first_kv.shape[2] - 1
        rows = torch.where(slot_mapping % block_size == 0, slot_mapping // block_size, spare)
        self.first_kv[0].index_copy_(1, rows, k.transpose(0, 1).to(self.first_kv.dtype))
        self.first_kv[1].index_copy_(1, rows, v.transpose(0, 1).to(self.first_kv.dtype))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata | StepMetadata) -> torch.Tensor:
        # q: [T, heads, d]; k, v: [T, kv_heads, d] -> [T, heads * d]
        if isinstance(meta, StepMetadata):
            outs, start = [], 0
            for part in meta.parts:
                end = start + part.slot_mapping.numel()
                outs.append(self.forward(q[start:end], k[start:end], v[start:end], part))
                start = end
            return torch.cat(outs)
        if self.k_cache_tensor is None:
            raise RuntimeError("no KV cache bound to this attention layer (bind_cache)")
        if self.key_offset is not None:
            k = k - self.key_offset
        meta = meta.for_window(self.sliding_window)
        if self.first_kv is not None:
            self.keep_first_tokens(k, v, meta.slot_mapping)
        if self.fused_attention is not None and self.fused_attention.applies(self, q, meta):
            return self.fused_attention(self, q, k, v, meta)
        self.k_cache(k, self.k_cache_tensor, meta.slot_mapping)
        self.v_cache(v, self.v_cache_tensor, meta.slot_mapping)
        first = None if self.first_kv is None else self.first_kv[:, :, meta.block_tables[:, 0]]   # [2, kvh, B, d]
        keys = self.k_cache.fetch(self.k_cache_tensor, meta.block_tables, q.dtype)      # [kvh, B, S, d]
        values = self.v_cache.fetch(self.v_cache_tensor, meta.block_tables, q.dtype)

        b, L, d = meta.batch_size, meta.max_query_len, self.head_dim
        kvh, g = self.num_kv_heads, self.num_heads // self.num_kv_heads
        # Heads that share a KV head are stacked along the query axis: no K/V duplication.
        qp = (q * self.scale)[meta.query_index].view(b, L, kvh, g, d).permute(2, 0, 3, 1, 4)    # [kvh, B, g, L, d]
        # Rows of softmax are independent: query blocks give the same numbers with scores of
        # [.., QUERY_BLOCK, S] at a time (the FP8 casts and measurement hooks see every row once).
        out = torch.cat([self._attend_block(qp[:, :, :, i:i + QUERY_BLOCK], keys, values,
                                            meta.attn_bias[..., i:i + QUERY_BLOCK, :], first)
                         for i in range(0, L, QUERY_BLOCK)], dim=3)                              # [kvh, B, g, L, d]
        out = out.permute(1, 3, 0, 2, 4).reshape(b * L, kvh * g * d)
        return out[meta.flat_index]

    def _attend_block(self, qp: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      bias: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """`first` [2, kvh, B, d]: key column 0's exact K/V (exact_first_token), else None."""
        kvh, b, g, lq, d = qp.shape
        s = keys.shape[2]
        queries = qp.reshape(kvh, b, g * lq, d)
        scores = self.matmul_qk(queries, keys.transpose(-1, -2), b_grid_scale=self.k_cache.grid_scale)  # [kvh, B, g*lq, S]
        if first is not None:
            scores[..., 0] = torch.einsum("hbqd,hbd->hbq", queries.float(), first[0].float()).to(scores.dtype)
        scores = scores.view(kvh, b, g, lq, s) + bias
        probs = self.softmax(scores, dim=-1).view(kvh, b, g * lq, s)
        if first is None:
            out = self.matmul_av(probs, values, b_grid_scale=self.v_cache.grid_scale)             # [kvh, B, g*lq, d]
        else:
            rest = probs.clone()
            rest[..., 0] = 0
            out = self.matmul_av(rest, values, b_grid_scale=self.v_cache.grid_scale)
            out = (out.float() + probs[..., :1].float() * first[1][:, :, None].float()).to(out.dtype)
        return out.view(kvh, b, g, lq, d)
