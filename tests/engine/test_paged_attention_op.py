"""The compiled CPU op for attention over block tables (`cpu_decode.paged_attention`) against the PyTorch
path (write, gather, masked SDPA) over the same tables: decode rows, multi-token runs (prefill chunks, a
speculative verify's k + 1 tokens) beside decodes, sliding windows with freed blocks, blocks shared by
prefix hits, head sizes with and without a register kernel, partial RoPE, GQA. Both go through
`Attention.forward`, so the projection split, norms, RoPE, the cache write and the gate are compared too."""

from __future__ import annotations

import pytest
import torch
from advisor.engine.model import cpu_decode
from advisor.engine.model.attention import Attention
from advisor.engine.model.config import FULL, SLIDING
from advisor.engine.model.layers import Rope
from advisor.engine.serving.paged_attention import ChunkTables, PagedKVCache, paged_meta

pytestmark = pytest.mark.skipif(
    cpu_decode.ops() is None, reason="no C++ toolchain: the PyTorch path runs alone"
)

BS = 4


class Cfg:
    def __init__(self, hkv: int, d: int, window: int):
        self.num_key_value_heads, self.head_dim, self.sliding_window = hkv, d, window
        self.layers = [None, None]
        self.layer_types = [FULL, SLIDING]


def attention(h: int, hkv: int, d: int, seed: int) -> Attention:
    g = torch.Generator().manual_seed(seed)
    a = Attention(h * d, h, hkv, d, 1e-6, d**-0.5)
    a.qkvg.weight.copy_(torch.randn(a.qkvg.weight.shape, generator=g) * 0.3)
    a.o.weight.copy_(torch.randn(a.o.weight.shape, generator=g) * 0.3)
    a.q_norm.weight.copy_(torch.randn(d, generator=g) * 0.1)
    a.k_norm.weight.copy_(torch.randn(d, generator=g) * 0.1)
    return a


def tables_for(runs, window: int, num_blocks: int, seed: int, shared: int = 0):
    """Block tables for runs [(start, n)]: shuffled ids; the first `shared` blocks the same for every
    sequence (a prefix hit); sliding tables with None before the window of each run's first token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(num_blocks, generator=g).tolist()
    head, ids = ids[:shared], ids[shared:]
    full, sliding = [], []
    for start, n in runs:
        nb = (start + n - 1) // BS + 1
        own = [ids.pop() for _ in range(nb - min(shared, nb))]
        t = (head + own)[:nb]
        full.append(t)
        first = max(0, start - window + 1) // BS
        sliding.append([None] * first + [ids.pop() for _ in range(nb - first)])
    return full, sliding


def run_both(runs, h=4, hkv=2, d=32, rot=16, window=6, shared=0, seed=0):
    """One step of the given runs through Attention.forward on two identical caches, op and PyTorch path;
    returns (op output, reference output, op caches, reference caches, the fused call's results)."""
    g = torch.Generator().manual_seed(seed + 1)
    num_blocks = 96
    caches = []
    for use_op in (True, False):
        c = PagedKVCache(Cfg(hkv, d, window), num_blocks, BS, torch.float32, "cpu")
        c.use_cpu_op = use_op
        caches.append(c)
    for i in (0, 1):
        k = torch.randn(caches[0].k[i].shape, generator=g)
        v = torch.randn(caches[0].v[i].shape, generator=g)
        for c in caches:
            c.k[i].copy_(k)
            c.v[i].copy_(v)
    full, sliding = tables_for(runs, window, num_blocks, seed, shared)
    chunks = [
        ChunkTables(s, n, {FULL: f, SLIDING: w}) for (s, n), f, w in zip(runs, full, sliding, strict=True)
    ]
    attn = attention(h, hkv, d, seed)
    T = sum(n for _, n in runs)
    x = torch.randn(1, T, h * d, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    outs, fused = [], []
    for c in caches:
        meta = paged_meta(c, chunks, "cpu")
        per_layer = []
        for layer, t in ((0, FULL), (1, SLIDING)):
            m = meta.types[t]
            rope = Rope(inv_freq, meta.positions, torch.float32)
            if c.use_cpu_op:
                fused.append(m.fused(cpu_decode.ops(), attn.qkvg(x)[0], attn, rope, layer) is not None)
                # fused() wrote this step's keys: put the old ones back before the real call
                for buf, src in ((c.k[layer], caches[1].k[layer]), (c.v[layer], caches[1].v[layer])):
                    buf.copy_(src)
            with torch.inference_mode():
                per_layer.append(attn(x, Rope(inv_freq, meta.positions, torch.float32), m, None, layer))
        outs.append(per_layer)
    return outs[0], outs[1], caches[0], caches[1], fused


def check(runs, **kw):
    got, want, c_op, c_ref, fused = run_both(runs, **kw)
    assert all(fused), "the compiled op did not run"
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    for layer in (0, 1):  # the new keys and values land in the same rows
        torch.testing.assert_close(c_op.k[layer], c_ref.k[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c_op.v[layer], c_ref.v[layer], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("h", "hkv", "d", "rot"), [(4, 2, 32, 16), (6, 2, 64, 64), (2, 2, 16, 8), (4, 1, 20, 10)]
)
def test_decode_rows_match_the_pytorch_path(h, hkv, d, rot):
    check([(0, 1), (3, 1), (4, 1), (9, 1), (17, 1), (30, 1)], h=h, hkv=hkv, d=d, rot=rot)


@pytest.mark.parametrize("d", [32, 20])
def test_multi_token_runs_beside_decodes_are_causal_within_the_run(d):
    # a fresh prefill chunk, a chunk continuing a prompt, a verify of k + 1 = 4 tokens, decodes; one run
    # longer than the op's 16-token tiles
    check([(0, 7), (9, 5), (21, 4), (12, 1), (5, 37), (2, 1)], d=d, rot=d // 2, seed=3)


@pytest.mark.parametrize("window", [1, 3, 8, 64])
def test_sliding_windows_read_only_their_last_positions(window):
    check([(0, 1), (13, 1), (25, 6), (40, 18)], window=window, seed=window)


def test_blocks_shared_by_a_prefix_hit_are_read_by_every_sequence():
    check([(12, 1), (12, 3), (14, 1), (20, 9)], shared=3, seed=7)


def test_a_freed_block_in_the_read_range_is_a_clear_error():
    c = PagedKVCache(Cfg(2, 32, 6), 16, BS, torch.float32, "cpu")
    meta = paged_meta(c, [ChunkTables(9, 1, {FULL: [3, None, 1], SLIDING: [None, 8, 2]})], "cpu")
    attn = attention(4, 2, 32, 0)
    x = torch.randn(1, 1, 4 * 32)
    rope = Rope(torch.ones(8), meta.positions, torch.float32)
    with pytest.raises(RuntimeError, match="freed or never allocated"):
        meta.types[FULL].fused(cpu_decode.ops(), attn.qkvg(x)[0], attn, rope, 0)
