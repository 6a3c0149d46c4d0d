"""Automatic prefix caching: full KV blocks keyed by a hash of their tokens and of everything
before them, shared by every sequence whose prompt starts the same way.

A block's key chains its parent's key, so equal keys mean equal token prefixes (blake2b, 128 bits:
a collision would silently mix two prompts, so not Python's 64-bit hash). Blocks no sequence
uses keep their contents and stay findable until the pool needs them: they are evicted least
recently used first.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def block_key(parent: bytes | None, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"")
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


class PrefixCache:
    """key -> block for full, computed blocks; the unused ones in LRU order (evictable)."""

    def __init__(self):
        self.blocks: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.unused: OrderedDict[int, None] = OrderedDict()
        self.queries = self.hits = 0           # in tokens, as vLLM counts them

    def lookup(self, key: bytes) -> int | None:
        return self.blocks.get(key)

    def register(self, key: bytes, block: int) -> None:
        """Makes `block` findable under `key`, unless another block already holds that prefix."""
        if key not in self.blocks and block not in self.key_of:
            self.blocks[key], self.key_of[block] = block, key

    def is_cached(self, block: int) -> bool:
        return block in self.key_of

    def release(self, block: int) -> None:
        """No sequence uses `block` any more: it stays cached, evictable."""
        self.unused[block] = None

    def reuse(self, block: int) -> None:
        """A sequence takes a cached block back from the evictable ones."""
        self.unused.pop(block, None)

    def evict(self) -> int:
        """The least recently used unused block, forgotten and handed out."""
        block, _ = self.unused.popitem(last=False)
        del self.blocks[self.key_of.pop(block)]
        return block

    @property
    def num_evictable(self) -> int:
        return len(self.unused)
