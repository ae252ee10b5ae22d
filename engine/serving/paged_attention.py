"""The paged KV cache's tensors and attention over block tables (the PyTorch path, any device).

A step's tokens, from every scheduled sequence (decodes and prefill chunks alike), run through the
model as one flat row [1, T]; only attention needs to know where one sequence ends and the next
begins. Per attention type, `paged_meta` turns the block tables into flat slot indices: where each new
token's key and value are written, and which slots each sequence reads (all its positions for full
attention, the last `window` for sliding layers), padded to one [N, S] gather. Attention then writes,
gathers and runs one masked SDPA for all N sequences, with the same mask rule as the static cache
(`engine.model.cache`: query t sees key s when 0 <= pos_s <= pos_t, inside the window).

Storage per layer: [num_blocks * block_size, Hkv, D] for keys and for values, block b's slot j at row
b * block_size + j, so a block table maps a position to a row with one multiply-add.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from engine.model.cache import StepMeta, _mask
from engine.model.config import FULL, SLIDING, TextConfig


class PagedKVCache:
    """Keys and values of every layer, in blocks; one pool (block id space) per attention type."""

    def __init__(self, cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        rows, hkv, d = num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for i, _ in enumerate(cfg.layers):
            self.k[i] = torch.zeros(rows, hkv, d, dtype=dtype, device=device)
            self.v[i] = torch.zeros(rows, hkv, d, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(cfg: TextConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block id costs across every layer (keys and values)."""
        per_layer = 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
        return per_layer * len(cfg.layers)

    def windows(self) -> dict[str, int | None]:
        return {t: (self.cfg.sliding_window if t == SLIDING else None) for t in self.cfg.layer_types}


@dataclass
class ChunkTables:
    """One scheduled chunk as attention sees it: positions [start, start + n) and the block tables."""

    start: int
    n: int
    tables: dict[str, list[int | None]]


@dataclass
class PagedTypeMeta:
    """How one attention type writes and reads the paged cache in one step (see the module doc)."""

    qpos: torch.Tensor  # [1, T] positions of the step's tokens
    window: int | None
    write: torch.Tensor  # [T] storage rows receiving the new keys
    q_index: torch.Tensor  # [N, Tq] each sequence's tokens in the flat row (padding: 0)
    q_valid: torch.Tensor  # [N, Tq] bool
    q_pos: torch.Tensor  # [N, Tq] positions, -1 at padding
    read: torch.Tensor  # [N, S] storage rows each sequence attends over (padding: 0)
    kpos: torch.Tensor  # [N, S] their positions, -1 at padding
    cache: PagedKVCache
    spans: list[tuple[int, int]]  # per sequence: positions [first attended, last + 1)
    tables: list[list[int | None]]  # per sequence: this attention type's block table
    slot: None = None  # never the static cache's one-slot decode (the compiled op reads a static cache)

    def decode_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Triton decode kernel's block tables [N, max_blocks] (int32), first positions and lengths."""
        width = max(len(t) for t in self.tables)
        rows = [[-1 if b is None else b for b in t] + [-1] * (width - len(t)) for t in self.tables]
        device = self.write.device
        tables = torch.tensor(rows, dtype=torch.int32, device=device)
        starts = torch.tensor([a for a, _ in self.spans], dtype=torch.int32, device=device)
        lengths = torch.tensor([b for _, b in self.spans], dtype=torch.int32, device=device)
        return tables, starts, lengths

    def _kernel(self, q: torch.Tensor):
        """The Triton decode kernel, where it applies: CUDA, one new token per sequence."""
        if not q.is_cuda or self.q_index.shape[1] != 1:
            return None
        from engine.kernels import paged_attention as kernel

        return kernel.paged_decode if kernel.available() else None

    @cached_property
    def mask(self) -> torch.Tensor:
        return _mask(self.q_pos, self.kpos, self.window)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float):
        """q [1, T, H, D], k and v [1, T, Hkv, D] (normed, rotated) -> attention output [1, T, H, D]."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[self.write] = k[0]
        vc[self.write] = v[0]
        decode = self._kernel(q)
        if decode is not None:  # decode-only step: the flat row is one token per sequence, in order
            return decode(q[0], kc, vc, *self.decode_args(), scale, self.cache.block_size)[None]
        keys = kc[self.read].transpose(1, 2)  # [N, Hkv, S, D]
        values = vc[self.read].transpose(1, 2)
        queries = q[0][self.q_index]  # [N, Tq, H, D]
        N, Tq, H, D = queries.shape
        hkv = keys.shape[1]
        G = H // hkv
        # GQA without repeating K/V: each KV head's query group folded into the query axis (as attention.py)
        qg = queries.view(N, Tq, hkv, G, D).permute(0, 2, 3, 1, 4).reshape(N, hkv, G * Tq, D)
        S = keys.shape[2]
        mask = self.mask.expand(N, G, Tq, S).reshape(N, 1, G * Tq, S) if G > 1 else self.mask
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale)
        out = out.view(N, hkv, G, Tq, D).permute(0, 3, 1, 2, 4).reshape(N, Tq, H, D)
        return out[self.q_valid][None]


def _rows(table: list[int | None], positions: torch.Tensor, block_size: int) -> torch.Tensor:
    ids = torch.tensor([-1 if b is None else b for b in table], dtype=torch.long)
    blocks = ids[positions // block_size]
    if bool((blocks < 0).any()):
        raise RuntimeError("paged attention: a position's block was freed or never allocated")
    return blocks * block_size + positions % block_size


def paged_meta(cache: PagedKVCache, chunks: list[ChunkTables], device) -> StepMeta:
    """The step's metadata for the model: flat positions and, per attention type, a PagedTypeMeta."""
    bs = cache.block_size
    pos = [torch.arange(c.start, c.start + c.n) for c in chunks]
    qpos = torch.cat(pos)[None]
    N, Tq = len(chunks), max(c.n for c in chunks)
    q_index = torch.zeros(N, Tq, dtype=torch.long)
    q_pos = torch.full((N, Tq), -1, dtype=torch.long)
    offset = 0
    for i, c in enumerate(chunks):
        q_index[i, : c.n] = torch.arange(offset, offset + c.n)
        q_pos[i, : c.n] = pos[i]
        offset += c.n
    q_valid = q_pos >= 0
    types = {}
    for t, window in cache.windows().items():
        write = torch.cat([_rows(c.tables[t], p, bs) for c, p in zip(chunks, pos, strict=True)])
        spans = [
            torch.arange(0 if window is None else max(0, c.start - window + 1), c.start + c.n) for c in chunks
        ]
        S = max(len(s) for s in spans)
        read = torch.zeros(N, S, dtype=torch.long)
        kpos = torch.full((N, S), -1, dtype=torch.long)
        for i, (c, s) in enumerate(zip(chunks, spans, strict=True)):
            read[i, : len(s)] = _rows(c.tables[t], s, bs)
            kpos[i, : len(s)] = s
        types[t] = PagedTypeMeta(
            qpos.to(device),
            window,
            write.to(device),
            q_index.to(device),
            q_valid.to(device),
            q_pos.to(device),
            read.to(device),
            kpos.to(device),
            cache,
            [
                (int(sp[0]) if len(sp) else c.start, c.start + c.n)
                for c, sp in zip(chunks, spans, strict=True)
            ],
            [c.tables[t] for c in chunks],
        )
    return StepMeta(qpos.to(device), types)


__all__ = ["FULL", "SLIDING", "ChunkTables", "PagedKVCache", "PagedTypeMeta", "paged_meta"]
