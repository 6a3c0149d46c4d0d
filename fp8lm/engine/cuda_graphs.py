"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket (vLLM's default on CUDA;
`--enforce-eager` turns it off).

A graph replays fixed shapes and fixed addresses, so a bucket's step is the decode step padded to
the bucket: `batch` rows, block tables as wide as max_model_len and one bias row of that many keys
per row. Rows past the real ones decode token 0 at position 0 into a scratch block no sequence owns
and see one key (so that no row is all -inf: NaN could reach a per-tensor dynamic scale). Every
row of a decode step is computed on its own, so the real rows' numbers do not depend on the padding
beyond the float32 summation order of a wider matmul.

Where nothing is captured (the CPU, or a failed capture) `run` executes the same padded step
eagerly: that is what the CPU tests compare with the unpadded step, and what a GPU check times captured.
"""
from __future__ import annotations

import logging
import time

import torch

from fp8lm.model.attention import AttentionMetadata

log = logging.getLogger(__name__)


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes captured: 1, 2, 4, 8, then every multiple of 8 up to max_num_seqs (vLLM's spacing)."""
    small = [b for b in (1, 2, 4) if b < max_num_seqs]
    return small + list(range(8, max_num_seqs, 8)) + [max_num_seqs]


class StaticDecodeStep:
    """One bucket's input buffers, its attention metadata over them, and (captured) its graph."""

    def __init__(self, batch: int, max_blocks: int, block_size: int, scratch_block: int,
                 device: torch.device, dtype: torch.dtype):
        self.block_size, self.scratch_block = block_size, scratch_block
        keys = max_blocks * block_size
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(batch, **long)
        self.positions = torch.zeros(batch, **long)
        rows = torch.arange(batch, **long)
        self.meta = AttentionMetadata(
            slot_mapping=torch.full((batch,), scratch_block * block_size, **long),
            block_tables=torch.full((batch, max_blocks), scratch_block, **long),
            max_context_len=keys, query_index=rows[:, None].clone(), flat_index=rows.clone(),
            attn_bias=torch.full((1, batch, 1, 1, keys), float("-inf"), dtype=dtype, device=device))
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None      # the captured step's output buffer

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """Copies a decode step of n <= batch rows in; the other rows become padding."""
        n, width = input_ids.shape[0], meta.block_tables.shape[1]
        s = self.meta
        self.input_ids.zero_()
        self.input_ids[:n].copy_(input_ids)
        self.positions.zero_()
        self.positions[:n].copy_(positions)
        s.slot_mapping.fill_(self.scratch_block * self.block_size)
        s.slot_mapping[:n].copy_(meta.slot_mapping)
        s.block_tables.fill_(self.scratch_block)
        s.block_tables[:n, :width].copy_(meta.block_tables)
        s.attn_bias.fill_(float("-inf"))
        s.attn_bias[:, :n, :, :, :width * self.block_size].copy_(meta.attn_bias)
        s.attn_bias[:, n:, :, :, 0] = 0                # padding rows see their own scratch key

    def run(self, model) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.hidden
        return model(self.input_ids, self.positions, self.meta)

    def capture(self, model, pool) -> None:
        """Two eager runs on a side stream (allocator and kernels settle), then the capture."""
        stream = torch.cuda.Stream(self.input_ids.device)
        stream.wait_stream(torch.cuda.current_stream(self.input_ids.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(self.input_ids, self.positions, self.meta)
        torch.cuda.current_stream(self.input_ids.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.hidden = model(self.input_ids, self.positions, self.meta)
        self.graph = graph


class DecodeGraphs:
    """The buckets' static steps; `run` serves a decode-only step of at most the largest bucket."""

    def __init__(self, model, buckets: list[int], max_blocks: int, block_size: int, scratch_block: int,
                 device: torch.device, dtype: torch.dtype):
        self.model = model
        self.steps = {b: StaticDecodeStep(b, max_blocks, block_size, scratch_block, device, dtype)
                      for b in sorted(set(buckets))}

    def applies(self, input_ids: torch.Tensor, meta) -> bool:
        return (isinstance(meta, AttentionMetadata) and meta.max_query_len == 1 and not meta.windows
                and input_ids.shape[0] <= max(self.steps))

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        step = self.steps[min(b for b in self.steps if b >= n)]
        step.load(input_ids, positions, meta)
        return step.run(self.model)[:n]

    @torch.inference_mode()
    def capture(self) -> bool:
        """Captures every bucket (largest first, sharing one memory pool); False, with a warning and
        the eager step kept, where capture fails."""
        start, pool = time.perf_counter(), torch.cuda.graph_pool_handle()
        timings = []
        try:
            for batch in sorted(self.steps, reverse=True):
                t = time.perf_counter()
                self.steps[batch].capture(self.model, pool)
                timings.append(f"{batch}: {time.perf_counter() - t:.2f} s")
        except Exception as e:  # a best-effort speed-up: whatever stops a capture, decode eagerly
            for step in self.steps.values():
                step.graph = step.hidden = None
            log.warning("CUDA graph capture failed, decoding eagerly (--enforce-eager skips the attempt): %s", e)
            return False
        log.info("CUDA graphs of %d decode batch sizes captured in %.2f s (%s)", len(self.steps),
                 time.perf_counter() - start, ", ".join(reversed(timings)))
        return True
