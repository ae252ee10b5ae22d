"""The Triton fused MoE (TRITON_INTERPRET=1 on the CPU, fp32/fp16) against its PyTorch twin
`advisor.engine.kernels.reference.fused_moe_torch` on routings the router never produces but the kernel must
handle: a token sending several slots to the same expert, int32 ids, idle experts.

Isolation as in test_fused_moe.py: TRITON_INTERPRET must be set before triton is first imported, so a
normal run re-runs this file in a fresh pytest subprocess with the variable set; only there are the real
tests defined.
"""

from __future__ import annotations

import os

import pytest

from tests.engine.interpreter import run_under_triton_interpreter

if os.environ.get("TRITON_INTERPRET") != "1":

    def test_kernel_vs_reference_under_the_triton_interpreter_in_a_subprocess():
        run_under_triton_interpreter(__file__)

else:
    import torch
    from advisor.engine.kernels.fused_moe import fused_moe
    from advisor.engine.kernels.reference import fused_moe_torch

    E = 8
    TOL = {torch.float32: 1e-5, torch.float16: 4e-3}  # relative to the output's scale

    def _weights(H: int, inter: int, dtype: torch.dtype, seed: int):
        g = torch.Generator().manual_seed(seed)
        w_gate = (torch.randn(E, inter, H, generator=g) / H**0.5).to(dtype)
        w_up = (torch.randn(E, inter, H, generator=g) / H**0.5).to(dtype)
        w_down = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(dtype)
        return w_gate, w_up, w_down

    def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        scale = want.float().abs().max().item()
        err = (got.float() - want.float()).abs().max().item()
        assert err <= TOL[dtype] * max(scale, 1e-3), f"max abs err {err:.3g} at scale {scale:.3g}"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("limit", [0.0, 0.6], ids=["noclamp", "clamp"])
    def test_repeated_expert_slots_and_idle_experts(dtype, limit):
        """T=17, k=3: slot 1 repeats slot 0's expert, slot 2 is another; experts 5..7 stay idle."""
        T, k, H, inter = 17, 3, 32, 48
        g = torch.Generator().manual_seed(21)
        x = torch.randn(T, H, generator=g).to(dtype)
        ids = torch.randint(0, 5, (T, k), generator=g, dtype=torch.int32)
        ids[:, 1] = ids[:, 0]
        weights = torch.rand(T, k, generator=g) * 3.0
        w = _weights(H, inter, dtype, seed=22)
        got = fused_moe(x, *w, weights, ids, swiglu_limit=limit)
        _close(got, fused_moe_torch(x, *w, weights, ids, swiglu_limit=limit), dtype)

    def test_all_slots_on_one_expert():
        """Every pair on expert 2 (one token's k slots included): a run of several M blocks for one expert,
        every other expert idle."""
        T, k, H, inter = 12, 2, 32, 32
        g = torch.Generator().manual_seed(31)
        x = torch.randn(T, H, generator=g)
        ids = torch.full((T, k), 2, dtype=torch.int64)
        weights = torch.rand(T, k, generator=g)
        w = _weights(H, inter, torch.float32, seed=32)
        _close(fused_moe(x, *w, weights, ids), fused_moe_torch(x, *w, weights, ids), torch.float32)
