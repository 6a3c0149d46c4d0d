"""The only place that turns scheduled sequences into tensors: it owns the KV cache, builds each
step's inputs and attention metadata, runs the model and returns logits."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8lm.engine.cuda_graphs import DecodeGraphs
from fp8lm.engine.sequence import Sequence
from fp8lm.model.attention import AttentionMetadata, StepMetadata, build_attn_bias
from fp8lm.model.llama import LlamaForCausalLM
from fp8lm.quant.fused_ops import HookWatch


# Prompt logits (prompt_logprobs) are computed in blocks of rows of at most this many bytes of float32
# logits (at least 128 rows): a 2,048-token chunk's are never [chunk, vocabulary] at once, and blocks
# stay large enough that the LM head's weights are not re-read for a few rows at a time.
PROMPT_LOGIT_BYTES = 64 << 20


@dataclass
class StepOutput:
    logits: torch.Tensor                      # [B, V] float32: logits after each sequence's last new token
    prompt_hidden: dict[int, torch.Tensor]    # seq_id -> [q, H]: after each of its new tokens (prompt_logprobs)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, max_model_len: int,
                 device: torch.device, dtype: torch.dtype, channel=None, decode_graph_buckets: list[int] | None = None):
        """`channel` (rank 0 under tensor parallelism) sends every step's inputs to the other ranks.
        `decode_graph_buckets`: decode steps of these batch sizes run padded through `DecodeGraphs`
        (captured by `graphs.capture()` on CUDA); the cache gets one scratch block for the padding."""
        self.model, self.device, self.dtype = model, device, dtype
        self.channel = channel
        self.block_size, self.num_blocks = block_size, num_blocks
        self.windows = sorted({w for w in model.config.layer_windows if w is not None})
        model.model.build_rope_caches(max_model_len, device, dtype)
        self._allocate_kv_cache(num_blocks + (1 if decode_graph_buckets else 0))
        self.graphs = None
        if decode_graph_buckets:
            self.graphs = DecodeGraphs(model, decode_graph_buckets, -(-max_model_len // block_size), block_size,
                                       num_blocks, device, dtype)
            self._hooks = HookWatch(list(model.modules()))       # a replayed graph runs no hooks

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        """One K and one V cache per layer, bound to the layer's attention."""
        for attn in self.model.attention_layers():
            shape = (attn.num_kv_heads, num_blocks, self.block_size, attn.head_dim)
            kv_dtype = attn.cache_dtype(self.dtype)
            # Zeroed, not empty: masked attention weights are 0, and 0 * NaN garbage would be NaN.
            k = torch.zeros(shape, dtype=kv_dtype, device=self.device)
            v = torch.zeros(shape, dtype=kv_dtype, device=self.device)
            first = None
            if attn.exact_first_token:
                first = torch.zeros((2, attn.num_kv_heads, num_blocks + 1, attn.head_dim), dtype=self.dtype,
                                    device=self.device)
            attn.bind_cache(k, v, first)

    def _tensor(self, data, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _metadata(self, seqs: list[Sequence], query_lens: list[int], positions: list[int],
                  slots: list[int]) -> AttentionMetadata:
        """One part of a step: its sequences' queries padded to the longest; each sequence's keys
        are its tokens up to its last query (blocks past them are not read)."""
        max_q = max(query_lens)
        context_lens = [s.num_computed_tokens + q for s, q in zip(seqs, query_lens)]
        tables = [s.block_table[:-(-n // self.block_size)] for s, n in zip(seqs, context_lens)]
        max_blocks = max(len(t) for t in tables)
        block_tables = [t + [0] * (max_blocks - len(t)) for t in tables]
        query_index, query_pos, flat_index = [], [], []
        start = 0
        for i, q in enumerate(query_lens):
            pad = max_q - q
            query_index.append(list(range(start, start + q)) + [start] * pad)
            query_pos.append(positions[start:start + q] + [0] * pad)
            flat_index.extend(range(i * max_q, i * max_q + q))
            start += q
        max_ctx = max_blocks * self.block_size
        qpos, ctx, slot_mapping = self._tensor(query_pos), self._tensor(context_lens), self._tensor(slots)
        first = [p[0] for p in query_pos]
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=self._tensor(block_tables),
            max_context_len=max_ctx,
            query_index=self._tensor(query_index),
            flat_index=self._tensor(flat_index),
            attn_bias=build_attn_bias(qpos, ctx, max_ctx, self.dtype),
            windows={w: self._window_view(w, tables, first, qpos, ctx, slot_mapping, query_index, flat_index)
                     for w in self.windows},
        )

    def _window_view(self, window: int, tables: list[list[int]], first_query: list[int], qpos, ctx, slot_mapping,
                     query_index, flat_index) -> AttentionMetadata:
        """The step for a layer with a sliding window: blocks before every query's window are cut."""
        skip = [max(0, p - window + 1) // self.block_size for p in first_query]
        tables = [t[k:] for t, k in zip(tables, skip)]
        max_blocks = max(len(t) for t in tables)
        max_ctx = max_blocks * self.block_size
        start = self._tensor([k * self.block_size for k in skip])
        return AttentionMetadata(
            slot_mapping=slot_mapping, block_tables=self._tensor([t + [0] * (max_blocks - len(t)) for t in tables]),
            max_context_len=max_ctx, query_index=self._tensor(query_index), flat_index=self._tensor(flat_index),
            attn_bias=build_attn_bias(qpos, ctx, max_ctx, self.dtype, window, start))

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def prepare(self, seqs: list[Sequence], query_lens: list[int]):
        """Flat inputs of a step: tokens num_computed_tokens .. + q of each sequence. Decodes (q = 1)
        come first (the scheduler's order) and attend as a part of their own, so a prompt chunk in
        the same step does not pad them to its length."""
        ids, positions, slots = [], [], []
        for seq, q in zip(seqs, query_lens):
            c = seq.num_computed_tokens
            ids.extend(seq.token_ids[c:c + q])
            positions.extend(range(c, c + q))
            slots.extend(self._slot(seq, p) for p in range(c, c + q))
        cut = next((i for i, q in enumerate(query_lens) if q > 1), len(seqs))    # decodes | prompt chunks
        parts = [self._metadata(seqs[a:b], query_lens[a:b], positions[ta:tb], slots[ta:tb])
                 for a, b, ta, tb in ((0, cut, 0, cut), (cut, len(seqs), cut, len(ids))) if b > a]
        meta = parts[0] if len(parts) == 1 else StepMetadata(parts)
        return self._tensor(ids), self._tensor(positions), meta

    @torch.inference_mode()
    def execute(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One forward pass of this rank's shard (every rank runs it with the same inputs)."""
        input_ids, positions, meta = input_ids.to(self.device), positions.to(self.device), _to_device(meta, self.device)
        if self.graphs is not None and self.graphs.applies(input_ids, meta) and not self._hooks.hooked():
            return self.graphs.run(input_ids, positions, meta)
        return self.model(input_ids, positions, meta)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], query_lens: list[int], want_prompt_logits: set[int] = frozenset()) -> StepOutput:
        input_ids, positions, meta = self.prepare(seqs, query_lens)
        if self.channel is not None:
            self.channel.send(("step", input_ids, positions, meta))
        hidden = self.execute(input_ids, positions, meta)
        ends = torch.tensor(query_lens).cumsum(0)
        logits = self.model.compute_logits(hidden[(ends - 1).to(self.device)])
        # Row i predicts token num_computed + i + 1 (the last row: past this chunk).
        prompt_hidden = {seq.seq_id: hidden[end - q:end] for seq, end, q in zip(seqs, ends.tolist(), query_lens)
                         if seq.seq_id in want_prompt_logits}
        return StepOutput(logits, prompt_hidden)

    @torch.inference_mode()
    def prompt_logit_blocks(self, hidden: torch.Tensor, rows: int | None = None):
        """(first row, float32 logits of a block of `rows` rows) over a sequence's prompt hidden states
        (None: as many rows as PROMPT_LOGIT_BYTES of logits hold)."""
        rows = rows or max(128, PROMPT_LOGIT_BYTES // (4 * self.model.config.vocab_size))
        for start in range(0, hidden.shape[0], rows):
            yield start, self.model.compute_logits(hidden[start:start + rows])


def _to_device(meta: AttentionMetadata | StepMetadata, device: torch.device) -> AttentionMetadata | StepMetadata:
    if isinstance(meta, StepMetadata):
        return StepMetadata([_to_device(part, device) for part in meta.parts])
    if meta.slot_mapping.device == device:
        return meta
    fields = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(meta).items()}
    fields["windows"] = {w: _to_device(view, device) for w, view in meta.windows.items()}
    return AttentionMetadata(**fields)
