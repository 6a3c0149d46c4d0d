"""Continuous batching under a token budget (max_num_batched_tokens per step).

Each step first gives every running sequence what it still has to compute — one token for a
decode, the next chunk of a prompt being prefilled — decodes first, so streams keep flowing while
a long prompt is prefilled in chunks; then admits waiting sequences while the budget, the sequence
slots and the KV pool allow (with chunked prefill the last one admitted may get only part of its
prompt). Without chunked prefill a prompt runs whole or waits. When the KV pool runs dry, the most
recently admitted running sequence is preempted: its blocks are freed and it is recomputed later
from its tokens, so no request is ever dropped."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from fp8lm.engine.block_manager import BlockManager
from fp8lm.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, on_preempt: Callable[[Sequence], None] | None = None):
        """`on_preempt`: told of each preempted sequence (what was computed of it is recomputed)."""
        self.block_manager = block_manager
        self.on_preempt = on_preempt
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], list[int]]:
        """Returns the step's sequences, decodes first, and how many new tokens each computes."""
        budget = self.max_num_batched_tokens
        batch = self._schedule_running(budget)
        budget -= sum(q for _, q in batch)
        batch += self._admit(budget)
        return [s for s, _ in batch], [q for _, q in batch]

    def _schedule_running(self, budget: int) -> list[tuple[Sequence, int]]:
        decodes, prefills = [], []
        queue = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)    # decodes first
        self.running = deque(queue)
        kept: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            left = seq.num_tokens - seq.num_computed_tokens
            q = min(left, budget) if self.chunked or left == 1 else (left if left <= budget else 0)
            if q == 0:
                kept.append(seq)
                continue
            while not self.block_manager.can_append(seq, seq.num_computed_tokens + q):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq, seq.num_computed_tokens + q)
                (decodes if left == 1 else prefills).append((seq, q))
                kept.append(seq)
                budget -= q
        self.running.extend(kept)
        return decodes + prefills

    def _admit(self, budget: int) -> list[tuple[Sequence, int]]:
        admitted = []
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if (not self.chunked and seq.num_tokens > budget) or not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            q = min(seq.num_tokens - seq.num_computed_tokens, budget)
            seq.status = SequenceStatus.RUNNING
            self.running.append(self.waiting.popleft())
            admitted.append((seq, q))
            budget -= q
        return admitted

    def preempt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.block_manager.free(seq)
        if self.on_preempt is not None:
            self.on_preempt(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Releases a sequence that the engine marked finished (or aborted)."""
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
