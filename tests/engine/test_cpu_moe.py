"""The compiled CPU decode MoE op: same results as the PyTorch expert path, used only where it applies."""

from __future__ import annotations

import pytest
import torch

from engine import cpu_moe
from engine.moe import MoE, experts_torch

op = cpu_moe.kernel()
needs_op = pytest.mark.skipif(op is None, reason="no C++ toolchain: the PyTorch path runs instead")


@needs_op
@pytest.mark.parametrize("tokens", [1, 2, 16])  # 16 x 4 pairs on 16 experts: experts shared by tokens
@pytest.mark.parametrize("limit", [0.0, 0.5])
def test_matches_the_pytorch_experts(tokens, limit):
    g = torch.Generator().manual_seed(tokens)
    E, H, inter, k = 16, 48, 24, 4
    gu, dn = torch.randn(E, H, 2 * inter, generator=g), torch.randn(E, inter, H, generator=g)
    x = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    want = experts_torch(x, gu, dn, w, ids, limit)
    got = op(x, gu, dn, w, ids, limit)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _moe() -> MoE:
    torch.manual_seed(0)
    m = MoE(
        hidden=32, inter=16, n_experts=8, top_k=2, shared_inter=16, scale=1.0, limit=7.0, limit_shared=0.0
    )
    for p in m.parameters():
        p.data = torch.randn_like(p) * 0.2
    m.prepare(use_kernel=False)
    return m


@needs_op
def test_the_moe_block_takes_it_for_a_few_tokens_only(monkeypatch):
    m = _moe()
    calls = []
    monkeypatch.setitem(cpu_moe._state, "op", lambda *a: calls.append(a[0].shape[0]) or op(*a))
    x = torch.randn(9, 32)
    with torch.inference_mode():
        one, four, many = m(x[:1]), m(x[:4]), m(x)  # 2 and 8 pairs on 8 experts: the op; 18: PyTorch
    assert calls == [1, 4]
    monkeypatch.setitem(cpu_moe._state, "op", None)
    with torch.inference_mode():
        torch.testing.assert_close(m(x[:1]), one, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m(x[:4]), four, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m(x)[:1], many[:1], rtol=1e-5, atol=1e-6)


def test_not_under_autograd_nor_for_other_dtypes():
    w, d = torch.zeros(4, 8, 16), torch.zeros(4, 8, 8)
    assert cpu_moe.usable(torch.zeros(1, 8), w, d, 2)
    assert not cpu_moe.usable(torch.zeros(1, 8, requires_grad=True), w, d, 2)
    assert not cpu_moe.usable(torch.zeros(1, 8, dtype=torch.bfloat16), w.bfloat16(), d.bfloat16(), 2)
    assert cpu_moe.usable(torch.zeros(2, 8), w, d, 4) and not cpu_moe.usable(torch.zeros(3, 8), w, d, 6)
    assert not cpu_moe.usable(torch.zeros(1, 8), w, d.transpose(1, 2), 2)  # down not K-major contiguous


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("ADVISOR_CPU_MOE", "0")
    assert cpu_moe._build() is None
