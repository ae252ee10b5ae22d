"""The paged KV cache's tensors and attention over block tables (the PyTorch path, any device).

A step's tokens, from every scheduled sequence (decodes and prefill chunks alike), run through the
model as one flat row [1, T]; only attention needs to know where one sequence ends and the next
begins. Per attention type, `paged_meta` turns the block tables into flat slot indices: where each new
token's key and value are written, and which slots each sequence reads (all its positions for full
attention, the last `window` for sliding layers), padded to one [N, S] gather. Attention then writes,
gathers and runs one masked SDPA for all N sequences, with the same mask rule as the static cache
(`advisor.engine.model.cache`: query t sees key s when 0 <= pos_s <= pos_t, inside the window).

Storage per layer: [num_blocks * block_size, Hkv, D] for keys and for values, block b's slot j at row
b * block_size + j, so a block table maps a position to a row with one multiply-add.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from advisor.engine.model import cpu_decode
from advisor.engine.model.cache import StepMeta, _mask
from advisor.engine.model.config import FULL, SLIDING, TextConfig


class PagedKVCache:
    """Keys and values of every layer, in blocks; one pool (block id space) per attention type."""

    def __init__(self, cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        self.use_cpu_op = True  # the compiled CPU op where it runs (off: the PyTorch path, the reference)
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
    """How one attention type writes and reads the paged cache in one step (see the module doc).

    Built per step from the chunks' block tables; what each path reads is derived on first use: the
    compiled CPU op (`cpu_decode.paged_attention`) takes the tables, run starts and run offsets as they
    are, the PyTorch path's padded gather indices are only built where it runs.
    """

    step: PagedStep
    window: int | None
    tables: list[list[int | None]]  # per sequence: this attention type's block table
    slot: None = None  # never the static cache's one-slot decode (the compiled op reads a static cache)

    @property
    def cache(self) -> PagedKVCache:
        return self.step.cache

    @property
    def qpos(self) -> torch.Tensor:
        return self.step.qpos

    @cached_property
    def spans(self) -> list[tuple[int, int]]:
        """Per sequence: positions [first attended, last + 1)."""
        w = self.window
        return [(0 if w is None else max(0, c.start - w + 1), c.start + c.n) for c in self.step.chunks]

    @cached_property
    def table_tensor(self) -> torch.Tensor:
        """[N, max blocks] int64 block ids, -1 where freed or past the table's end (on the CPU)."""
        width = max(len(t) for t in self.tables)
        return torch.tensor(
            [[-1 if b is None else b for b in t] + [-1] * (width - len(t)) for t in self.tables]
        )

    def decode_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Triton decode kernel's block tables [N, max_blocks] (int32), first positions and lengths."""
        device = self.step.device
        tables = self.table_tensor.to(device=device, dtype=torch.int32)
        starts = torch.tensor([a for a, _ in self.spans], dtype=torch.int32, device=device)
        lengths = torch.tensor([b for _, b in self.spans], dtype=torch.int32, device=device)
        return tables, starts, lengths

    # ------------------------------------------------------------------ the PyTorch path's gather
    @cached_property
    def write(self) -> torch.Tensor:
        """[T] storage rows receiving the new keys."""
        rows = _rows(self.table_tensor, self.step.seq_index, self.step.flat_pos, self.cache.block_size)
        return rows.to(self.step.device)

    @cached_property
    def _gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """read [N, S] storage rows each sequence attends over (padding: 0) and kpos [N, S] their
        positions (-1 at padding)."""
        spans = self.spans
        S = max(b - a for a, b in spans)
        first = torch.tensor([a for a, _ in spans])[:, None]
        end = torch.tensor([b for _, b in spans])[:, None]
        kpos = first + torch.arange(S)[None]
        valid = kpos < end
        kpos = torch.where(valid, kpos, -1)
        seq = torch.arange(len(spans))[:, None].expand(-1, S)
        read = torch.where(
            valid, _rows(self.table_tensor, seq, kpos.clamp(min=0), self.cache.block_size, valid), 0
        )
        return read.to(self.step.device), kpos.to(self.step.device)

    @property
    def read(self) -> torch.Tensor:
        return self._gather[0]

    @property
    def kpos(self) -> torch.Tensor:
        return self._gather[1]

    @property
    def q_index(self) -> torch.Tensor:
        return self.step.q_index

    @property
    def q_valid(self) -> torch.Tensor:
        return self.step.q_valid

    @property
    def q_pos(self) -> torch.Tensor:
        return self.step.q_pos

    def _kernel(self, q: torch.Tensor):
        """The Triton decode kernel, where it applies: CUDA, one new token per sequence."""
        if not q.is_cuda or not self.step.decode_only:
            return None
        from advisor.engine.kernels import paged_attention as kernel

        return kernel.paged_decode if kernel.available() else None

    @cached_property
    def mask(self) -> torch.Tensor:
        return _mask(self.q_pos, self.kpos, self.window)

    # ------------------------------------------------------------------ attention
    def fused(self, ops, qkvg: torch.Tensor, attn, rope, layer: int) -> torch.Tensor | None:
        """Attention from the fused projection qkvg [T, width] through the compiled CPU op (q/k norm, RoPE,
        the cache write, attention and the gate in one call): [T, H * D], or None where the op does not
        run (no compiled ops, not fp32 on the CPU, or the cache's `use_cpu_op` off)."""
        cache = self.cache
        kc, vc = cache.k[layer], cache.v[layer]
        if ops is None or not cache.use_cpu_op or not cpu_decode.usable(qkvg, kc):
            return None
        T = qkvg.shape[0]
        cos, sin = rope.cos_sin
        return ops.paged_attention(
            qkvg.contiguous(),
            attn.q_norm.scale(),
            attn.k_norm.scale(),
            cos.reshape(T, -1),
            sin.reshape(T, -1),
            kc,
            vc,
            self.table_tensor,
            self.step.cu_q,
            self.step.starts,
            cache.block_size,
            self.window or 0,
            attn.h,
            attn.q_norm.eps,
            attn.scale,
        )

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


def _rows(
    tables: torch.Tensor, seq: torch.Tensor, positions: torch.Tensor, block_size: int, valid=None
) -> torch.Tensor:
    """Storage rows of `positions` in the sequences `seq` (same shapes) through the block tables."""
    blocks = tables[seq, positions // block_size]
    bad = blocks < 0 if valid is None else (blocks < 0) & valid
    if bool(bad.any()):
        raise RuntimeError("paged attention: a position's block was freed or never allocated")
    return blocks * block_size + positions % block_size


class PagedStep:
    """The chunks of one step as attention sees them, shared by the attention types: where each
    sequence's run of tokens sits in the flat row and at which positions."""

    def __init__(self, cache: PagedKVCache, chunks: list[ChunkTables], device):
        self.cache, self.chunks, self.device = cache, chunks, torch.device(device)
        n = [c.n for c in chunks]
        self.decode_only = all(x == 1 for x in n)
        self.cu_q = torch.tensor([0, *itertools.accumulate(n)])  # [N + 1] each run's offset in the flat row
        self.starts = torch.tensor([c.start for c in chunks])  # [N] each run's first position
        flat = [p for c in chunks for p in range(c.start, c.start + c.n)]
        self.flat_pos = torch.tensor(flat)  # [T] (on the CPU)
        self.qpos = self.flat_pos.to(self.device)[None]  # [1, T]

    @cached_property
    def seq_index(self) -> torch.Tensor:
        """[T] the sequence of each flat token."""
        return torch.repeat_interleave(torch.arange(len(self.chunks)), self.cu_q.diff())

    @cached_property
    def _queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q_index [N, Tq] each sequence's tokens in the flat row (padding: 0), q_pos [N, Tq] their
        positions (-1 at padding)."""
        lengths = self.cu_q.diff()[:, None]
        j = torch.arange(int(lengths.max()))[None]
        valid = j < lengths
        q_index = torch.where(valid, self.cu_q[:-1, None] + j, 0)
        q_pos = torch.where(valid, self.starts[:, None] + j, -1)
        return q_index.to(self.device), q_pos.to(self.device)

    @property
    def q_index(self) -> torch.Tensor:
        return self._queries[0]

    @property
    def q_pos(self) -> torch.Tensor:
        return self._queries[1]

    @cached_property
    def q_valid(self) -> torch.Tensor:
        return self.q_pos >= 0


def paged_meta(cache: PagedKVCache, chunks: list[ChunkTables], device) -> StepMeta:
    """The step's metadata for the model: flat positions and, per attention type, a PagedTypeMeta."""
    step = PagedStep(cache, chunks, device)
    types = {
        t: PagedTypeMeta(step, window, [c.tables[t] for c in chunks]) for t, window in cache.windows().items()
    }
    return StepMeta(step.qpos, types)


__all__ = ["FULL", "SLIDING", "ChunkTables", "PagedKVCache", "PagedStep", "PagedTypeMeta", "paged_meta"]
