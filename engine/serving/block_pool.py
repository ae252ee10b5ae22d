"""The KV block pool: fixed-size blocks, reference counts, and the prefix cache over them.

A block holds `block_size` consecutive tokens' keys and values (for every layer of one attention type;
`advisor.engine.serving.kv_cache` owns the tensors, this module only the bookkeeping). A sequence owns a block
table: the ids of its blocks in token order. Blocks are shared by reference count: two sequences with a
common prefix point at the same blocks.

Prefix cache (as vLLM's automatic prefix caching): once a block is full and computed it is registered
under a key that hashes its tokens and the key of the block before it (so a key names the whole prefix
up to the block's end), plus a digest of the prompt's images for blocks at or after an image token. A
new sequence walks its keys and takes every block already cached. A block whose last reference goes
stays cached (in LRU order) and is only reused, and forgotten, when the pool needs a free block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BlockKey = bytes


def block_key(parent: BlockKey | None, tokens: Sequence[int], extra: bytes = b"") -> BlockKey:
    """The prefix-cache key of a full block: its tokens, the key before it, and `extra` (image digests)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", tokens).tobytes())
    h.update(extra)
    return h.digest()


@dataclass
class Block:
    id: int
    ref: int = 0
    key: BlockKey | None = None  # set while the block is in the prefix cache


class PoolExhausted(RuntimeError):
    """No free block and no unreferenced cached block left to evict."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs blocks: num_blocks={num_blocks}, block_size={block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never cached: popped from the end
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._cached: dict[BlockKey, int] = {}
        self.in_use_peak = 0

    # ------------------------------------------------------------------ capacity
    @property
    def num_available(self) -> int:
        """Blocks `allocate` can hand out now (free ones and evictable cached ones)."""
        return len(self._free) + len(self._lru)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - self.num_available

    # ------------------------------------------------------------------ allocation
    def allocate(self) -> int:
        """A block with one reference; an unreferenced cached block is evicted (oldest first) if need be."""
        if self._free:
            bid = self._free.pop()
        elif self._lru:
            bid, _ = self._lru.popitem(last=False)
            block = self.blocks[bid]
            del self._cached[block.key]
            block.key = None
        else:
            raise PoolExhausted(
                f"KV block pool exhausted ({self.num_blocks} blocks of {self.block_size} tokens)"
            )
        self.blocks[bid].ref = 1
        self.in_use_peak = max(self.in_use_peak, self.num_in_use)
        return bid

    def release(self, bid: int) -> None:
        """Drop one reference; at zero a cached block waits in the LRU, an uncached one is free."""
        block = self.blocks[bid]
        if block.ref <= 0:
            raise RuntimeError(f"block {bid} released more often than taken")
        block.ref -= 1
        if block.ref == 0:
            if block.key is not None:
                self._lru[bid] = None
            else:
                self._free.append(bid)

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, key: BlockKey) -> int | None:
        """The cached block under `key`, if any (no reference taken)."""
        return self._cached.get(key)

    def take(self, bid: int) -> None:
        """One more reference to a cached block (a prefix hit); it leaves the LRU if it was there."""
        block = self.blocks[bid]
        if block.ref == 0:
            del self._lru[bid]
        block.ref += 1
        self.in_use_peak = max(self.in_use_peak, self.num_in_use)

    def register(self, bid: int, key: BlockKey) -> None:
        """Cache a full, computed block under `key`. A key already cached keeps its block (the same
        prefix computed twice at once): this one stays private and is freed as usual."""
        block = self.blocks[bid]
        if block.key is not None or key in self._cached:
            return
        block.key = key
        self._cached[key] = bid

    def num_cached(self) -> int:
        return len(self._cached)
