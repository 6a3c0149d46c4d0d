"""The KV cache as a pool of fixed-size blocks; pure bookkeeping, no tensors."""
from __future__ import annotations

from collections import deque

from fp8lm.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(seq.num_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of the sequence's tokens (its prompt, or prompt + output when recomputed)."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        seq.block_table = [self.free_blocks.popleft() for _ in range(self.blocks_for(seq.num_tokens))]

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's newest token (about to be decoded) has a slot or one can be given."""
        return self.blocks_for(seq.num_tokens) <= len(seq.block_table) + len(self.free_blocks)

    def may_append(self, seq: Sequence) -> None:
        while len(seq.block_table) < self.blocks_for(seq.num_tokens):
            seq.block_table.append(self.free_blocks.popleft())
