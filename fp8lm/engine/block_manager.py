"""The KV cache as a pool of fixed-size blocks; pure bookkeeping, no tensors. With prefix caching,
full blocks are shared between sequences (reference counts) and kept after their last user is done
(engine/prefix_cache.py)."""
from __future__ import annotations

from collections import deque

from fp8lm.engine.prefix_cache import PrefixCache, block_key
from fp8lm.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.refs = [0] * num_blocks
        self.cache = PrefixCache() if enable_prefix_caching else None

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get now: never used, or cached but unused (evicted on demand)."""
        return len(self.free_blocks) + (self.cache.num_evictable if self.cache else 0)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _cached_prefix(self, seq: Sequence, cached: bool) -> list[int]:
        """Cached blocks holding the start of the sequence's tokens; the last token is always left
        to compute (its logits are needed), and prompts that want every prompt position's logits
        (prompt_logprobs, `cached` False) compute everything."""
        if self.cache is None or not cached or seq.params.prompt_logprobs is not None:
            return []
        blocks = []
        for key in self._keys(seq, (seq.num_tokens - 1) // self.block_size):
            block = self.cache.lookup(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The prefix-cache keys of the sequence's first `num_blocks` full blocks, each computed once
        (tokens are only ever appended, so a full block's key never changes)."""
        keys = seq.block_keys
        while len(keys) < num_blocks:
            i = len(keys)
            keys.append(block_key(keys[-1] if keys else None, seq.token_ids[i * self.block_size:(i + 1) * self.block_size]))
        return keys[:num_blocks]

    def can_allocate(self, seq: Sequence, cached: bool = True) -> bool:
        hits = self._cached_prefix(seq, cached)
        reusable = sum(1 for b in hits if self.refs[b] == 0)      # those would leave the evictable pool
        return self.blocks_for(seq.num_tokens) - len(hits) <= self.num_free_blocks - reusable

    def allocate(self, seq: Sequence, cached: bool = True) -> None:
        """Blocks for all of the sequence's tokens (its prompt, or prompt + output when recomputed):
        cached ones for its longest cached prefix (already computed), fresh ones for the rest."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        hits = self._cached_prefix(seq, cached)
        for b in hits:
            if self.refs[b] == 0:
                self.cache.reuse(b)
            self.refs[b] += 1
        seq.block_table = hits + [self._take() for _ in range(self.blocks_for(seq.num_tokens) - len(hits))]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        if self.cache is not None and cached:
            self.cache.queries += seq.num_tokens
            self.cache.hits += seq.num_cached_tokens

    def _take(self) -> int:
        block = self.free_blocks.popleft() if self.free_blocks else self.cache.evict()
        self.refs[block] = 1
        return block

    def free(self, seq: Sequence) -> None:
        for b in seq.block_table:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if self.cache is not None and self.cache.is_cached(b):
                    self.cache.release(b)
                else:
                    self.free_blocks.append(b)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the sequence can hold `num_tokens` tokens in total (taking free blocks if needed)."""
        return self.blocks_for(num_tokens) <= len(seq.block_table) + self.num_free_blocks

    def may_append(self, seq: Sequence, num_tokens: int) -> None:
        while len(seq.block_table) < self.blocks_for(num_tokens):
            seq.block_table.append(self._take())

    def mark_computed(self, seq: Sequence, computed_before: int) -> None:
        """After a step that took the sequence from `computed_before` to num_computed_tokens: the
        blocks it filled become findable."""
        if self.cache is None:
            return
        first, full = computed_before // self.block_size, seq.num_computed_tokens // self.block_size
        for i, key in enumerate(self._keys(seq, full)[first:], start=first):
            self.cache.register(key, seq.block_table[i])
