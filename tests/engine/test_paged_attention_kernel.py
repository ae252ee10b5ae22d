"""The Triton paged-attention decode kernel under TRITON_INTERPRET=1 on the CPU, in fp32, against plain
PyTorch attention over the same block tables (`paged_decode_torch`: shuffled block ids, GQA, sliding
windows, ragged lengths); and the same through the serving core's attention metadata. See test_fused_moe.py for the subprocess."""

from __future__ import annotations

import os

import pytest

from tests.engine.interpreter import run_under_triton_interpreter

if os.environ.get("TRITON_INTERPRET") != "1":

    def test_paged_decode_under_the_triton_interpreter_in_a_subprocess():
        pytest.importorskip("triton")
        run_under_triton_interpreter(__file__)

else:
    import torch
    from advisor.engine.kernels.paged_attention import paged_decode, paged_decode_torch

    @pytest.mark.parametrize(("H", "hkv", "D", "bs"), [(4, 2, 16, 4), (6, 3, 32, 16), (2, 2, 20, 8)])
    def test_kernel_matches_attention_over_the_block_tables(H, hkv, D, bs):
        g = torch.Generator().manual_seed(H * D + bs)
        num_blocks, N = 40, 5
        kc = torch.randn(num_blocks * bs, hkv, D, generator=g)
        vc = torch.randn(num_blocks * bs, hkv, D, generator=g)
        lengths = torch.tensor([1, bs, 3 * bs + 1, 5 * bs - 2, 7])
        window = torch.tensor([0, 0, 5, 0, 3])  # 0: full attention
        starts = torch.where(window > 0, (lengths - window).clamp(min=0), torch.zeros_like(lengths))
        max_blocks = int((lengths.max() + bs - 1) // bs)
        perm = torch.randperm(num_blocks, generator=g)[: N * max_blocks]
        tables = perm.view(N, max_blocks).to(torch.int32)
        q = torch.randn(N, H, D, generator=g)
        scale = D**-0.5
        got = paged_decode(q, kc, vc, tables, starts, lengths, scale, bs)
        torch.testing.assert_close(
            got, paged_decode_torch(q, kc, vc, tables, starts, lengths, scale, bs), rtol=1e-5, atol=1e-5
        )

    def test_the_serving_metadata_gives_the_kernel_what_the_pytorch_path_reads():
        from advisor.engine.model.config import FULL, SLIDING
        from advisor.engine.serving.paged_attention import ChunkTables, PagedKVCache, paged_meta

        class Cfg:
            num_key_value_heads, head_dim, sliding_window = 2, 16, 5
            layers = [None, None]
            layer_types = [FULL, SLIDING]

        bs = 4
        cache = PagedKVCache(Cfg, 32, bs, torch.float32, "cpu")
        g = torch.Generator().manual_seed(0)
        for i in (0, 1):
            cache.k[i].copy_(torch.randn(cache.k[i].shape, generator=g))
            cache.v[i].copy_(torch.randn(cache.v[i].shape, generator=g))
        chunks = [
            ChunkTables(9, 1, {FULL: [3, 7, 1], SLIDING: [None, 8, 2]}),
            ChunkTables(2, 1, {FULL: [5], SLIDING: [6]}),
        ]
        meta = paged_meta(cache, chunks, "cpu")
        q = torch.randn(1, 2, 4, 16, generator=g)
        k = torch.randn(1, 2, 2, 16, generator=g)
        v = torch.randn(1, 2, 2, 16, generator=g)
        for layer, t in ((0, FULL), (1, SLIDING)):
            m = meta.types[t]
            want = m.attend(q, k, v, layer, 0.25)[0]  # writes this step's keys, then attends
            tables, starts, lengths = m.decode_args()
            got = paged_decode(q[0], cache.k[layer], cache.v[layer], tables, starts, lengths, 0.25, bs)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
