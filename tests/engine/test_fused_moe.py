"""The Triton fused MoE under TRITON_INTERPRET=1 on the CPU (fp32 and fp16: the interpreter's bf16 tl.dot is
broken), against the engine's PyTorch expert path and transformers' Step3p7Experts on the same weights.

Isolation: TRITON_INTERPRET must be set before triton is first imported (kernels are bound to the
interpreter when decorated), and setting it inside the main pytest process would leak into other tests.
So in a normal run this module holds a single test that re-runs this file in a fresh pytest subprocess
with TRITON_INTERPRET=1; there (or in any run that already has the variable set) the real tests below are
defined and run. A failure shows the subprocess's report in the assertion message.
"""

from __future__ import annotations

import os

import pytest

from tests.engine.interpreter import run_under_triton_interpreter

if os.environ.get("TRITON_INTERPRET") != "1":

    def test_fused_moe_under_the_triton_interpreter_in_a_subprocess():
        run_under_triton_interpreter(__file__)

else:
    import json

    import torch
    from advisor.engine.kernels import bench_moe, configs
    from advisor.engine.kernels.align import moe_align_block_size
    from advisor.engine.kernels.align_kernel import moe_align_block_size_triton
    from advisor.engine.kernels.configs import GemmConfig, MoEConfig
    from advisor.engine.kernels.fused_moe import fused_moe
    from advisor.engine.model import moe
    from advisor.engine.model.moe import experts_torch

    from tests.engine.step_models import reference_experts

    E = 8
    TOL = {torch.float32: 2e-5, torch.float16: 4e-3}  # relative to the output's scale

    def _case(T: int, k: int, H: int, inter: int, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(T, H, generator=g).to(dtype)
        w_gate_up = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(dtype)  # checkpoint layout
        w_down = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(dtype)
        # Experts 0..5 only: experts 6 and 7 get no tokens.
        ids = torch.stack([torch.randperm(E - 2, generator=g)[:k] for _ in range(T)])
        weights = torch.rand(T, k, generator=g) * 3.0
        return x, w_gate_up, w_down, weights, ids

    def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
        assert got.shape == want.shape
        scale = want.float().abs().max().item()
        err = (got.float() - want.float()).abs().max().item()
        assert err <= TOL[dtype] * max(scale, 1e-3), f"max abs err {err:.3g} at scale {scale:.3g}"

    @pytest.mark.parametrize(
        "T,k,experts,bm",
        [(1, 2, 8, 16), (5, 3, 8, 4), (33, 2, 8, 16), (64, 8, 8, 1), (100, 8, 288, 16), (0, 2, 8, 16)],
    )
    def test_triton_alignment_equals_the_pytorch_one(T, k, experts, bm):
        """One-launch alignment: exactly the (fully checked) PyTorch version's output, including experts
        with no tokens (routing over 288 experts with 100 tokens leaves many idle)."""
        g = torch.Generator().manual_seed(T + bm)
        ids = torch.rand(T, experts, generator=g).topk(k, dim=-1).indices
        want, got = moe_align_block_size(ids, experts, bm), moe_align_block_size_triton(ids, experts, bm)
        assert torch.equal(got.sorted_ids, want.sorted_ids)
        assert torch.equal(got.block_expert, want.block_expert)
        assert torch.equal(got.num_tokens_post_padded, want.num_tokens_post_padded)

    def test_triton_alignment_of_one_hot_expert_over_several_chunks():
        ids = torch.full((150, 1), 3)  # 150 pairs: three 64-pair chunks, ranks carried across them
        got = moe_align_block_size_triton(ids, 8, 16)
        assert int(got.num_tokens_post_padded) == 160 and got.sorted_ids[:150].tolist() == list(range(150))
        assert (got.block_expert[:10] == 3).all()

    SHAPES = [(1, 2, 32, 32), (5, 3, 64, 48), (33, 2, 32, 48)]

    @pytest.mark.parametrize("T,k,H,inter", SHAPES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("limit", [0.0, 0.6], ids=["noclamp", "clamp"])
    def test_matches_the_pytorch_path_andreference_experts(T, k, H, inter, dtype, limit):
        x, w_gate_up, w_down, weights, ids = _case(T, k, H, inter, dtype)
        w_gate, w_up = w_gate_up[:, :inter].contiguous(), w_gate_up[:, inter:].contiguous()
        got = fused_moe(x, w_gate, w_up, w_down, weights, ids, swiglu_limit=limit)
        assert got.dtype == dtype and got.shape == x.shape
        # The engine's PyTorch path in fp32 on the same (rounded) weights, and transformers in the dtype.
        f = [t.float() for t in (x, w_gate_up, w_down)]
        ours = experts_torch(f[0], f[1].transpose(1, 2), f[2].transpose(1, 2), weights, ids, limit)
        _close(got, ours, dtype)
        _close(got, reference_experts(x, w_gate_up, w_down, weights, ids, limit), dtype)
        # The clamp must bite at this limit (otherwise the clamped cases would prove nothing).
        if limit:
            unclamped = experts_torch(f[0], f[1].transpose(1, 2), f[2].transpose(1, 2), weights, ids, 0.0)
            assert (unclamped - ours).abs().max() > 10 * TOL[dtype] * ours.abs().max()

    # Tiles narrower than the matrices: masked N and K edges (48 = 32 + 16), several M blocks per expert,
    # grouped launch order (GROUP_M > 1), K loops of several steps.
    SMALL = MoEConfig(16, GemmConfig(32, 16, 2, 1, 1), GemmConfig(16, 32, 4, 1, 1))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    def test_small_tiles_with_masked_edges_and_grouped_order(dtype):
        x, w_gate_up, w_down, weights, ids = _case(33, 3, 64, 48, dtype, seed=3)
        inter = 48
        got = fused_moe(
            x,
            w_gate_up[:, :inter].contiguous(),
            w_gate_up[:, inter:].contiguous(),
            w_down,
            weights,
            ids,
            swiglu_limit=0.6,
            config=SMALL,
        )
        _close(got, reference_experts(x, w_gate_up, w_down, weights, ids, 0.6), dtype)

    def test_packed_gate_up_views_and_a_hot_expert():
        """w_up=None: w_gate is the packed [E, 2I, H] tensor (strided views, no copy); all tokens on one
        expert fill several blocks of it."""
        x, w_gate_up, w_down, weights, _ = _case(20, 2, 32, 32, torch.float32, seed=5)
        ids = torch.stack([torch.full((20,), 4), torch.arange(20) % 3], dim=1)
        got = fused_moe(x, w_gate_up, None, w_down, weights, ids)
        _close(got, reference_experts(x, w_gate_up, w_down, weights, ids, 0.0), torch.float32)

    def test_strided_activations():
        """x as a column-major view (what a transpose upstream hands over): read through its strides."""
        x, w_gate_up, w_down, weights, ids = _case(5, 2, 32, 32, torch.float32, seed=9)
        xt = x.t().contiguous().t()
        assert not xt.is_contiguous()
        got = fused_moe(xt, w_gate_up, None, w_down, weights, ids, swiglu_limit=0.6)
        assert got.is_contiguous()
        _close(got, reference_experts(x, w_gate_up, w_down, weights, ids, 0.6), torch.float32)

    def test_no_tokens_and_bad_shapes():
        x, w_gate_up, w_down, weights, ids = _case(3, 2, 32, 32, torch.float32)
        w_gate, w_up = w_gate_up[:, :32], w_gate_up[:, 32:]
        empty = fused_moe(x[:0], w_gate, w_up, w_down, weights[:0], ids[:0])
        assert empty.shape == (0, 32)
        with pytest.raises(ValueError, match=r"w_down has shape \(8, 32, 16\), expected \(8, 32, 32\)"):
            fused_moe(x, w_gate, w_up, w_down[..., :16], weights, ids)
        with pytest.raises(ValueError, match="w_up is torch.float16"):
            fused_moe(x, w_gate, w_up.half(), w_down, weights, ids)
        with pytest.raises(ValueError, match=r"must both be \[T=3, k\]"):
            fused_moe(x, w_gate, w_up, w_down, weights[:, :1], ids)

    @pytest.mark.parametrize("limit", [0.0, 0.3])
    def test_moe_block_dispatches_to_the_kernel(limit):
        """advisor.engine.model.moe.MoE with the kernel layout ("split", as finalize picks on CUDA) runs the real kernel
        through moe.fused_moe_kernel(); it matches the same block on the PyTorch layout."""
        assert moe.fused_moe_kernel() is fused_moe
        H, inter = 32, 16
        g = torch.Generator().manual_seed(7)
        block = moe.MoE(H, inter, E, 3, 16, scale=2.5, limit=limit, limit_shared=0.0)
        for p in block.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        reference = moe.MoE(H, inter, E, 3, 16, scale=2.5, limit=limit, limit_shared=0.0)
        reference.load_state_dict(block.state_dict())
        reference.prepare(use_kernel=False)
        block.prepare(use_kernel=True)
        assert block.layout == "split"
        x = torch.randn(2, 5, H, generator=g)
        with torch.no_grad():
            _close(block(x), reference(x), torch.float32)

    def test_bench_logic_at_tiny_shapes():
        shape = bench_moe.Shape(experts=E, top_k=2, hidden=32, inter=48)
        rows = bench_moe.bench(shape, [1, 5], torch.float32, "cpu", iters=1, peak=1e9, limit=0.6, warmup=0)
        assert [r.batch for r in rows] == [1, 5]
        for r in rows:
            assert r.max_rel_err < 1e-4
            assert 1 <= r.experts_hit <= min(E, 2 * r.batch)
            assert r.weight_bytes == r.experts_hit * 3 * 48 * 32 * 4
            assert r.triton_tok_s == pytest.approx(r.batch / (r.triton_ms / 1e3))
            assert r.triton_bw == pytest.approx(r.weight_bytes / (r.triton_ms / 1e3) / 1e9)
        table = bench_moe.format_table(rows)
        assert len(table.splitlines()) == 3 and "HBM" in table

    def test_tune_writes_a_table_the_loader_reads(tmp_path):
        out = tmp_path / "table.json"
        shape = ["--experts", "8", "--top-k", "2", "--hidden", "32", "--inter", "32", "--dtype", "fp32"]
        small = {
            "BLOCK_M": (16,),
            "BLOCK_N": (16, 32),
            "BLOCK_K": (32,),
            "num_warps": (1,),
            "num_stages": (1,),
        }
        orig = bench_moe.tune
        bench_moe.tune = lambda *a, **kw: orig(*a, candidates=small, **kw)
        try:
            args = ["--device", "cpu", "--tune", "--batches", "3", "--iters", "1", "--warmup", "0"]
            assert bench_moe.main([*shape, *args, "--out", str(out)]) == 0
        finally:
            bench_moe.tune = orig
        table = configs.load_table(out)
        assert set(table) == {3} and table[3].BLOCK_M == 16 and table[3].gate_up.BLOCK_N in (16, 32)
        assert json.loads(out.read_text())["_source"].startswith("bench_moe --tune")
