"""Block tables per sequence: allocation, prefix-cache hits, sliding-window release.

Full-attention and sliding-window layers keep their keys in separate pools (one per attention type, as
vLLM's hybrid KV groups): a sliding layer only needs the last `window` positions, so its blocks are
handed back as soon as they leave the window, while the full layers' blocks stay for the whole
sequence. Both pools share one key chain, so a prefix hit is the longest prefix whose blocks every pool
still has: all of them for full attention, those inside the window before the hit point for sliding.

A speculating sequence's blocks also hold its MTP layers' entries (`advisor.engine.serving.speculation`). Layer
j's entry at position p reads token x_{p+j}, so the entries at a block's end depend on the k tokens after
it: such a block is cached, and only found, under a key that also hashes those k tokens (and is only
cached once every layer's entries in it are firm, `Sequence.computed_horizon`). Plain and speculating
requests therefore never share blocks; requests with the same k do.
"""

from __future__ import annotations

from array import array

from advisor.engine.serving.block_pool import BlockKey, BlockPool, block_key
from advisor.engine.serving.sequence import Sequence


class BlockManager:
    def __init__(
        self,
        windows: dict[str, int | None],
        num_blocks: int,
        block_size: int,
        image_token_id: int | None = None,
    ):
        self.block_size = block_size
        self.windows = windows  # attention type -> sliding window (None: full attention)
        self.pools = {t: BlockPool(num_blocks, block_size) for t in windows}
        self.image_token_id = image_token_id

    # ------------------------------------------------------------------ keys
    def _first_image(self, seq: Sequence) -> int | None:
        if not seq.image_key or self.image_token_id is None:
            return None
        try:
            return seq.prompt.index(self.image_token_id)
        except ValueError:
            return None

    def _extend_keys(self, seq: Sequence, upto_blocks: int) -> list[BlockKey]:
        """The sequence's block keys for its first `upto_blocks` full blocks (computed once, kept)."""
        bs = self.block_size
        first_image = self._first_image(seq) if len(seq.keys) < upto_blocks else None
        ahead = seq.spec.k if seq.spec is not None else 0
        while len(seq.keys) < upto_blocks:
            i = len(seq.keys)
            toks = [seq.token_at(j) for j in range(i * bs, (i + 1) * bs)]
            extra = seq.image_key if first_image is not None and first_image < (i + 1) * bs else b""
            if ahead:  # the MTP entries' inputs past the block's end (see the module doc)
                after = [seq.token_at(j) for j in range((i + 1) * bs, (i + 1) * bs + ahead)]
                extra += b"mtp" + array("q", after).tobytes()
            seq.keys.append(block_key(seq.keys[-1] if seq.keys else None, toks, extra))
        return seq.keys

    def _first_needed(self, t: str, computed: int) -> int:
        """The first block an attention type still reads once `computed` tokens are in the cache."""
        w = self.windows[t]
        return 0 if w is None else max(0, computed - w + 1) // self.block_size

    # ------------------------------------------------------------------ admission
    def prefix_hit(self, seq: Sequence) -> dict[str, list[int | None]]:
        """Block tables for the longest cached prefix (whole blocks, at least one token left to compute)."""
        bs = self.block_size
        ahead = seq.spec.k if seq.spec is not None else 0
        keys = self._extend_keys(seq, max(0, seq.num_tokens - 1 - ahead) // bs)
        # Full layers need every block of the prefix: the hit can be no longer than their chain.
        h = len(keys)
        for t, w in self.windows.items():
            if w is None:
                pool = self.pools[t]
                n = 0
                while n < h and pool.lookup(keys[n]) is not None:
                    n += 1
                h = n
        while h > 0:
            tables: dict[str, list[int | None]] = {}
            for t, pool in self.pools.items():
                lo = self._first_needed(t, h * bs)
                ids = [pool.lookup(keys[i]) for i in range(lo, h)]
                if any(b is None for b in ids):
                    break
                tables[t] = [None] * lo + ids
            else:
                return tables
            h -= 1
        return {t: [] for t in self.pools}

    def _new_blocks(self, t: str, table_len: int, total: int) -> int:
        return max(0, -(-total // self.block_size) - table_len)

    def admit(self, seq: Sequence, n: int) -> bool:
        """Give a waiting sequence its prefix hit and blocks for its next `n` tokens (fewer if the hit
        covers them); False, with nothing taken, when a pool lacks the room."""
        tables = self.prefix_hit(seq)
        hit = len(next(iter(tables.values())))
        computed = hit * self.block_size
        n = min(n, seq.num_tokens - computed)
        for t, pool in self.pools.items():
            from_lru = sum(1 for b in tables[t] if b is not None and pool.blocks[b].ref == 0)
            if pool.num_available - from_lru < self._new_blocks(t, len(tables[t]), computed + n):
                return False
        for t, pool in self.pools.items():
            for b in tables[t]:
                if b is not None:
                    pool.take(b)
            seq.tables[t] = tables[t]
        seq.num_computed, seq.registered = computed, hit
        if seq.spec is not None:  # the hit's blocks hold firm MTP entries too (their keys say so)
            seq.spec.reset(computed)
        self.allocate(seq, n)
        return True

    # ------------------------------------------------------------------ running
    def can_allocate(self, seq: Sequence, n: int) -> bool:
        total = seq.num_computed + n
        return all(
            self.pools[t].num_available >= self._new_blocks(t, len(seq.tables[t]), total) for t in self.pools
        )

    def allocate(self, seq: Sequence, n: int) -> None:
        """Blocks for positions up to num_computed + n (call after `can_allocate`)."""
        total = seq.num_computed + n
        for t, pool in self.pools.items():
            table = seq.tables[t]
            for _ in range(self._new_blocks(t, len(table), total)):
                table.append(pool.allocate())

    def commit(self, seq: Sequence) -> None:
        """After a step: cache the blocks that became full, hand back sliding blocks out of the window."""
        bs = self.block_size
        done = seq.computed_horizon
        full = done // bs
        keys = self._extend_keys(seq, full)
        for t, pool in self.pools.items():
            table = seq.tables[t]
            for i in range(seq.registered, full):
                if table[i] is not None:
                    pool.register(table[i], keys[i])
            for i in range(self._first_needed(t, done)):
                if table[i] is not None:
                    pool.release(table[i])
                    table[i] = None
        seq.registered = max(seq.registered, full)

    def truncate(self, seq: Sequence) -> None:
        """Hand back the blocks past the sequence's computed positions (the rejected drafts' slots: never
        cached, so they are free at once)."""
        keep = -(-seq.num_computed // self.block_size)
        for t, table in seq.tables.items():
            pool = self.pools[t]
            for b in table[keep:]:
                if b is not None:
                    pool.release(b)
            del table[keep:]

    def free(self, seq: Sequence) -> None:
        """Hand back every block of the sequence (cached ones stay cached, in LRU order)."""
        for t, table in seq.tables.items():
            pool = self.pools[t]
            # Last blocks first into the LRU: the prefix's head, shared most, is evicted last.
            for b in reversed(table):
                if b is not None:
                    pool.release(b)
        seq.tables, seq.registered = {}, 0
