"""Continuous batching under a token budget (max_num_batched_tokens per step).

Each step first gives every running sequence what it still has to compute — one token for a
decode, the next chunk of a prompt being prefilled — decodes first, so streams keep flowing while
a long prompt is prefilled in chunks; then admits waiting sequences while the budget, the sequence
slots and the KV pool allow (with chunked prefill the last one admitted may get only part of its
prompt). While any sequence decodes, prompt chunks together take at most `prompt_tokens_while_decoding`
of a step (each decode waits for the whole step it is in); with none decoding they take the whole
budget. Without chunked prefill a prompt runs whole or waits. When the KV pool runs dry, the most
recently admitted running sequence is preempted: its blocks are freed and it is recomputed later
from its tokens, so no request is ever dropped."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from fp8lm.engine.block_manager import BlockManager
from fp8lm.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, on_preempt: Callable[[Sequence], None] | None = None,
                 prompt_tokens_while_decoding: int | None = None):
        """`on_preempt`: told of each preempted sequence (what was computed of it is recomputed)."""
        self.block_manager = block_manager
        self.on_preempt = on_preempt
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.prompt_tokens_while_decoding = prompt_tokens_while_decoding
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
        budget, prompt_budget = self.max_num_batched_tokens, self._prompt_budget()
        batch = self._schedule_running(budget, prompt_budget)
        budget -= sum(q for _, q in batch)
        prompt_budget -= sum(q for s, q in batch if not _decoding(s))
        batch += self._admit(min(budget, prompt_budget))
        return [s for s, _ in batch], [q for _, q in batch]

    def _prompt_budget(self) -> int:
        """Prompt tokens the step may take: the cap while a running sequence decodes, else the budget."""
        capped = self.chunked and self.prompt_tokens_while_decoding is not None and any(map(_decoding, self.running))
        return self.prompt_tokens_while_decoding if capped else self.max_num_batched_tokens

    def _schedule_running(self, budget: int, prompt_budget: int) -> list[tuple[Sequence, int]]:
        decodes, prefills = [], []
        self.running = deque(sorted(self.running, key=lambda s: not _decoding(s)))     # decodes first
        kept: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            left = seq.num_tokens - seq.num_computed_tokens
            room = budget if left == 1 else min(budget, prompt_budget)
            q = min(left, room) if self.chunked or left == 1 else (left if left <= budget else 0)
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
                prompt_budget -= 0 if left == 1 else q
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


def _decoding(seq: Sequence) -> bool:
    """The sequence's next step computes one token: a decode (not a prompt chunk)."""
    return seq.num_tokens - seq.num_computed_tokens == 1
