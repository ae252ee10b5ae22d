"""Static KV cache and per-step attention metadata.

Every batch row advances one column per step (prompts are left-padded), so one column counter serves
the whole batch; each key slot also records the absolute position of its token (-1 for padding or an
empty slot), and the attention masks are built from positions alone. That single rule gives causality,
padding and the sliding window at once, for any slot order.

Full-attention layers keep every column in a preallocated [B, Hkv, max_len, D] buffer. Sliding layers
keep a ring of `window` slots (column c lives in slot c % window): exactly the keys a query can still see.

Speculative decoding writes a few columns that may be taken back (`truncate`): the ring then has `spare`
more slots, so the rejected drafts' keys never overwrite a key that a later query still sees. After a
truncate that leaves the rows at different lengths, the cache is ragged: each row appends at its own
column (`row_lengths`), and writes go through per-row slot indices (the PyTorch path, not the one-token
CPU op). This is the interface a paged block pool takes over: a sequence's cache length, shortened.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from advisor.engine.model.config import FULL, SLIDING, TextConfig


@dataclass
class TypeMeta:
    """How one attention type (full or sliding) reads and writes keys during one forward step (valid for
    that step: `kpos` may view the cache's live slot positions)."""

    qpos: torch.Tensor  # [B, T] positions of the queries
    kpos: torch.Tensor  # [B, S] positions of the keys attended, -1 for padding or an empty slot
    window: int | None  # sliding window, None for full attention
    # cache slots receiving this step's keys (None: no cache); a ragged cache's (row index, slot index),
    # both [B, T]
    write: slice | torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None
    write_from: int  # first of this step's T tokens that is stored (rings keep only the last `window`)
    attend_cache: bool  # True: attend over the cache after writing; False: over [old cache keys, new keys]
    read: slice | None  # cache slots to read when attend_cache (or the old keys otherwise)
    slot: int | None = None  # decode (one new token per row): the one cache slot written, as an int

    @cached_property
    def mask(self) -> torch.Tensor:
        """bool [B, 1, T, S]: query t may see key s (built on first use: the CPU decode op needs none)."""
        return _mask(self.qpos, self.kpos, self.window)


@dataclass
class StepMeta:
    positions: torch.Tensor  # [B, T] absolute positions, -1 at padding
    types: dict[str, TypeMeta]


def _mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    q = qpos[:, :, None]
    k = kpos[:, None, :]
    m = (k >= 0) & (k <= q)
    if window is not None:
        m &= k > q - window
    # A padding query sees nothing; let it see everything so softmax stays finite (its output is unused).
    m |= ~m.any(-1, keepdim=True)
    return m[:, None]


def _window(cfg: TextConfig, t: str) -> int | None:
    return cfg.sliding_window if t == SLIDING else None


class KVCache:
    def __init__(
        self,
        cfg: TextConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        spare: int = 0,
    ):
        self.cfg = cfg
        self.batch, self.max_len = batch, max_len
        self.length = 0  # columns written so far (the longest row's, once ragged)
        self.row_lengths: list[int] | None = None  # per row, once a truncate left rows at different lengths
        d, hkv = cfg.head_dim, cfg.num_key_value_heads
        ring = (cfg.sliding_window + spare) if cfg.sliding_window else max_len
        self.cap = {FULL: max_len, SLIDING: min(max_len, ring)}
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for layer in cfg.layers:
            n = self.cap[layer.attention]
            self.k.append(torch.zeros(batch, hkv, n, d, dtype=dtype, device=device))
            self.v.append(torch.zeros(batch, hkv, n, d, dtype=dtype, device=device))
        self.pos = {
            t: torch.full((batch, n), -1, dtype=torch.long, device=device) for t, n in self.cap.items()
        }

    def repeat_rows(self, batch: int) -> None:
        """A one-row cache becomes `batch` identical rows: a prompt prefix shared by every row is computed
        once, then each row goes on from it (`repeat`, not `expand`: the rows' own keys are written in place)."""
        if self.batch != 1:
            raise ValueError(f"repeat_rows needs a one-row cache, this one has {self.batch} rows")
        self.k = [k.repeat(batch, 1, 1, 1) for k in self.k]
        self.v = [v.repeat(batch, 1, 1, 1) for v in self.v]
        self.pos = {t: p.repeat(batch, 1) for t, p in self.pos.items()}
        self.batch = batch

    def plan(self, positions: torch.Tensor) -> StepMeta:
        """Metadata for appending T columns with the given positions; updates the slot positions."""
        if self.row_lengths is not None:
            return self._plan_ragged(positions)
        _, T = positions.shape
        L = self.length
        if L + T > self.max_len:
            raise ValueError(f"KV cache full: {L} + {T} tokens exceeds max_len {self.max_len}")
        types: dict[str, TypeMeta] = {}
        for t in {layer.attention for layer in self.cfg.layers}:
            cap, pos = self.cap[t], self.pos[t]
            window = _window(self.cfg, t)
            if cap == self.max_len:  # linear buffer: write then attend over [0, L+T)
                pos[:, L : L + T] = positions
                types[t] = TypeMeta(
                    positions,
                    pos[:, : L + T],
                    window,
                    slice(L, L + T),
                    0,
                    True,
                    slice(0, L + T),
                    L if T == 1 else None,
                )
                continue
            if T == 1:  # decode: the ring already holds everything this query can see
                slot = L % cap
                pos[:, slot] = positions[:, 0]
                types[t] = TypeMeta(
                    positions, pos, window, slice(slot, slot + 1), 0, True, slice(0, cap), slot
                )
            else:  # prefill/chunk: attend over [old ring, new keys], then store the tail
                first = max(0, T - cap)  # only the last `cap` new tokens survive in the ring
                slots = torch.arange(L + first, L + T, device=positions.device) % cap
                # A fresh cache's ring is empty: attend over the new keys alone, not `cap` empty slots too.
                old = slice(0, cap if L else 0)
                kpos = torch.cat([pos[:, old], positions], dim=1)
                types[t] = TypeMeta(positions, kpos, window, slots, first, False, old)
                pos[:, slots] = positions[:, first:]
        self.length = L + T
        return StepMeta(positions, types)

    def lengths(self) -> list[int]:
        """Each row's columns written so far."""
        return list(self.row_lengths) if self.row_lengths is not None else [self.length] * self.batch

    def truncate(self, lengths: list[int]) -> None:
        """Roll each row back to `lengths[b]` columns (at most its present length, and at most `spare` + 1
        columns back on sliding layers): the dropped columns' keys become invisible (position -1) and the
        row's next tokens are written there."""
        old = self.lengths()
        if len(lengths) != self.batch or any(n < 0 or n > o for n, o in zip(lengths, old, strict=True)):
            raise ValueError(f"truncate: lengths {lengths} must be per row and within {old}")
        width = max(o - n for n, o in zip(lengths, old, strict=True))
        if width:
            dev = next(iter(self.pos.values())).device
            new = torch.tensor(lengths, device=dev)
            cols = new[:, None] + torch.arange(width, device=dev)
            drop = cols < torch.tensor(old, device=dev)[:, None]
            rows = torch.arange(self.batch, device=dev)[:, None].expand(-1, width)
            for t, pos in self.pos.items():
                pos[rows[drop], cols[drop] % self.cap[t]] = -1
        same = all(n == lengths[0] for n in lengths)
        self.row_lengths = None if same else list(lengths)
        self.length = max(lengths)

    def _plan_ragged(self, positions: torch.Tensor) -> StepMeta:
        """Append T columns to each row at its own length: write first, then attend over the buffer (a
        ring holds every key a query sees while T <= spare + 1: the keys written past the window's start
        are ones no query of this step can see)."""
        B, T = positions.shape
        lengths = self.row_lengths
        assert lengths is not None
        if max(lengths) + T > self.max_len:
            raise ValueError(f"KV cache full: {max(lengths)} + {T} tokens exceeds max_len {self.max_len}")
        dev = positions.device
        cols = torch.tensor(lengths, device=dev)[:, None] + torch.arange(T, device=dev)
        rows = torch.arange(B, device=dev)[:, None].expand(-1, T)
        types: dict[str, TypeMeta] = {}
        for t in {layer.attention for layer in self.cfg.layers}:
            cap, pos = self.cap[t], self.pos[t]
            if cap < self.max_len and T > cap - (self.cfg.sliding_window or cap) + 1:
                raise ValueError(f"ragged cache: {T} new tokens do not fit the ring's {cap} slots")
            slots = cols % cap
            pos[rows, slots] = positions
            n = min(cap, max(lengths) + T)
            types[t] = TypeMeta(positions, pos[:, :n], _window(self.cfg, t), (rows, slots), 0, True, slice(0, n))
        self.row_lengths = [n + T for n in lengths]
        self.length = max(self.row_lengths)
        return StepMeta(positions, types)


def uncached_meta(cfg: TextConfig, positions: torch.Tensor) -> StepMeta:
    """Metadata for a forward pass over a whole sequence without any cache."""
    types = {
        t: TypeMeta(positions, positions, _window(cfg, t), None, 0, False, None)
        for t in {layer.attention for layer in cfg.layers}
    }
    return StepMeta(positions, types)
