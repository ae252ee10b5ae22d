"""The compiled ops on quantized weights against dequantize-then-matmul: `qlinear` (projections) and
`decode_moe_q` (router and routed experts), every format, row counts that exercise each register tile
(1 to 4 rows, their remainders, 16, 64) and a padded last panel, through both the CPU's best 4-bit kernels
(AVX2 + FMA where it has them) and the generic loops, which must agree with the same reference."""

from __future__ import annotations

import pytest
import torch
from advisor.engine.model import cpu_decode
from advisor.engine.model.layers import swiglu
from advisor.engine.model.moe import route
from advisor.engine.quant import formats as F
from advisor.engine.quant.packed import from_checkpoint

from tests.engine.kernel_sets import KERNEL_SETS, kernel_set

ops = cpu_decode.ops()
pytestmark = pytest.mark.skipif(ops is None, reason="the compiled CPU ops are not built here")

FORMATS = [("fp8", 128), ("int4", 32), ("int4", 128), ("nvfp4", 16)]


def _qweight(fmt, group, w):
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


@pytest.fixture(params=KERNEL_SETS)
def kernels(request):
    """Which 4-bit kernels run."""
    with kernel_set(ops, request.param) as name:
        yield name


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("fmt,group", FORMATS, ids=lambda v: str(v))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 64])
def test_qlinear_equals_dequantize_then_matmul(kernels, fmt, group, rows):
    g = torch.Generator().manual_seed(rows)
    n, k = 40, 256  # 40 outputs: a last panel of 8 columns
    w = torch.randn(1, n, k, generator=g) * 0.05
    q = _qweight(fmt, group, w)
    x = torch.randn(rows, k, generator=g)
    want = x @ q.dequantize_k_major(0)  # the PyTorch dequantization, not the op's
    s2 = q.scale_2[0] if q.scale_2.numel() else q.scale_2
    got = ops.qlinear(x, q.codes[0], q.scales[0], s2, q.fmt_id, q.group, n)
    assert got.shape == (rows, n)
    assert _rel(got, want) < 2e-6


@pytest.mark.parametrize("fmt,group", FORMATS, ids=lambda v: str(v))
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_decode_moe_q_equals_the_dequantized_experts(kernels, fmt, group, tokens):
    g = torch.Generator().manual_seed(tokens)
    E, H, I, top_k, limit = 8, 256, 128, 3, 7.0  # noqa: E741
    gate_up = torch.randn(E, 2 * I, H, generator=g) * 0.05
    down = torch.randn(E, H, I, generator=g) * 0.05
    router, bias = torch.randn(E, H, generator=g), torch.randn(E, generator=g) * 0.1
    x = torch.randn(tokens, H, generator=g)
    qg, qd = _qweight(fmt, group, gate_up), _qweight(fmt, group, down)
    got = ops.decode_moe_q(
        x, router, bias, top_k, 2.5, qg.codes, qg.scales, qg.scale_2, qd.codes, qd.scales, qd.scale_2,
        qg.fmt_id, qg.group, qd.group, I, limit,
    )  # fmt: skip
    weights, ids = route(x, router, bias, top_k, 2.5)
    gu, dn = qg.dequantize_k_major(), qd.dequantize_k_major()  # [E, H, 2I], [E, I, H]
    want = torch.zeros_like(x)
    for t in range(tokens):
        for j in range(top_k):
            e = int(ids[t, j])
            want[t] += weights[t, j] * (swiglu(x[t] @ gu[e], limit) @ dn[e])
    assert _rel(got, want) < 2e-6
