"""The Triton fused MoE on quantized experts (FP8 block scales, int4 groups, NVFP4) under TRITON_INTERPRET=1
on the CPU, fp32 and fp16 activations with tiny shapes (the interpreter's bf16 tl.dot is broken), against
the PyTorch path on the same weights dequantized (`advisor.engine.model.moe.experts_quantized`). Re-runs itself in
a subprocess with the interpreter on, as tests/engine/test_fused_moe.py does."""

from __future__ import annotations

import os

import pytest

from tests.engine.interpreter import run_under_triton_interpreter

if os.environ.get("TRITON_INTERPRET") != "1":

    def test_quantized_fused_moe_under_the_triton_interpreter_in_a_subprocess():
        run_under_triton_interpreter(__file__)

else:
    import torch
    from advisor.engine.kernels.configs import GemmConfig
    from advisor.engine.kernels.fused_moe_quant import fused_moe_quantized
    from advisor.engine.model.moe import experts_quantized, route
    from advisor.engine.quant import formats as F
    from advisor.engine.quant.packed import concat_outputs, from_checkpoint

    E, H, I = 6, 96, 64  # noqa: E741
    TOL = {torch.float32: 2e-5, torch.float16: 4e-3}

    def _q(fmt, w, group):
        if fmt == "fp8":
            q, s = F.fp8_quantize(w, group)
            t = {"weight": q, "weight_scale_inv": s}
        elif fmt == "nvfp4":
            p, s, s2 = F.nvfp4_quantize(w)
            t = {"weight": p, "weight_scale": s, "weight_scale_2": s2}
        else:
            p, s, shape = F.int4_quantize(w, group)
            t = {"weight_packed": p, "weight_scale": s, "weight_shape": shape}
        return from_checkpoint(fmt, group, t, tuple(w.shape))

    def _experts(fmt, group, seed=0):
        g = torch.Generator().manual_seed(seed)
        gate = torch.randn(E, I, H, generator=g) / H**0.5
        up = torch.randn(E, I, H, generator=g) / H**0.5
        down = torch.randn(E, H, I, generator=g) / I**0.5
        return concat_outputs([_q(fmt, gate, group), _q(fmt, up, group)]), _q(fmt, down, group)

    @pytest.mark.parametrize(
        "fmt, group", [("fp8", 128), ("int4", 16), ("int4", 32), ("nvfp4", 16)]
    )
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("tokens, limit", [(1, 0.0), (5, 0.4)])
    def test_matches_the_dequantized_pytorch_path(fmt, group, dtype, tokens, limit):
        gu, dn = _experts(fmt, group)
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, H, generator=g)
        router, bias = torch.randn(E, H, generator=g), torch.zeros(E)
        weights, ids = route(x, router, bias, 3, 2.0)
        want = experts_quantized(x, gu, dn, weights, ids, limit)
        tiles = (16, GemmConfig(16, 16, 1, 1, 1), GemmConfig(32, 32, 1, 1, 1))
        got = fused_moe_quantized(x.to(dtype), gu, dn, weights, ids, swiglu_limit=limit, tiles=tiles)
        assert got.dtype is dtype
        err = float((got.float() - want).abs().max() / want.abs().max())
        assert err < TOL[dtype], err

    def test_the_format_tile_tables_run():
        gu, dn = _experts("int4", 32, seed=1)
        x = torch.randn(4, H)
        weights, ids = route(x, torch.randn(E, H), torch.zeros(E), 2, 1.0)
        want = experts_quantized(x, gu, dn, weights, ids, 0.0)
        got = fused_moe_quantized(x, gu, dn, weights, ids)
        assert float((got - want).abs().max() / want.abs().max()) < TOL[torch.float32]
