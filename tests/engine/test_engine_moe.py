"""The MoE block's PyTorch path: routing rules and both expert schedules (grouped GEMM and per-expert loop)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from advisor.engine.model import moe
from advisor.engine.model.moe import experts_torch, route


def _naive(x, w_gate_up, w_down, weights, ids, limit):
    out = torch.zeros_like(x)
    inter = w_gate_up.shape[1] // 2
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate = F.silu(x[t] @ w_gate_up[e, :inter].T)
            up = x[t] @ w_gate_up[e, inter:].T
            if limit > 0:
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            out[t] += weights[t, j] * ((gate * up) @ w_down[e].T)
    return out


def test_route_uses_bias_for_selection_only():
    x = torch.randn(5, 8)
    w = torch.randn(4, 8)
    bias = torch.tensor([0.0, 0.0, 0.0, 100.0])  # expert 3 always selected, but weighted by its own score
    weights, ids = route(x, w, bias, top_k=2, scale=3.0)
    assert (ids == 3).any(dim=1).all()
    scores = torch.sigmoid(x @ w.T)
    picked = scores.gather(1, ids)
    torch.testing.assert_close(weights, 3.0 * picked / picked.sum(1, keepdim=True))
    assert weights.dtype == torch.float32


@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("limit", [0.0, 0.05])
@pytest.mark.parametrize("schedule", [None, "loop", "padded", "grouped"])
def test_expert_schedules_match_naive(tokens, limit, schedule):
    if schedule == "grouped" and not moe._HAS_GROUPED_MM:
        schedule = "padded"
    g = torch.Generator().manual_seed(tokens)
    E, H, inter, k = 6, 16, 8, 2
    x = torch.randn(tokens, H, generator=g)
    wgu = torch.randn(E, 2 * inter, H, generator=g) * 0.3
    wd = torch.randn(E, H, inter, generator=g) * 0.3
    weights, ids = route(x, torch.randn(E, H, generator=g), torch.zeros(E), k, 2.0)
    wgu_t, wd_t = wgu.transpose(1, 2).contiguous(), wd.transpose(1, 2).contiguous()
    got = experts_torch(x, wgu_t, wd_t, weights, ids, limit, schedule=schedule)
    torch.testing.assert_close(got, _naive(x, wgu, wd, weights, ids, limit), rtol=1e-5, atol=1e-5)


def test_kernel_layout_hands_the_fused_moe_contract_its_tensors(monkeypatch):
    """With the Triton kernel in use, MoE passes (x, w_gate [E,I,H], w_up [E,I,H], w_down [E,H,I],
    fp32 weights [T,k], ids [T,k], swiglu_limit); here a PyTorch stand-in checks shapes and semantics."""
    seen = {}

    def fake_fused_moe(x, w_gate, w_up, w_down, topk_weights, topk_ids, swiglu_limit=0.0):
        seen.update(gate=tuple(w_gate.shape), contiguous=w_gate.is_contiguous() and w_up.is_contiguous())
        assert topk_weights.dtype == torch.float32
        wgu = torch.cat([w_gate, w_up], dim=1)
        return _naive(x, wgu, w_down, topk_weights, topk_ids, swiglu_limit)

    E, H, inter = 6, 16, 8
    g = torch.Generator().manual_seed(0)
    block = moe.MoE(H, inter, E, 2, 8, scale=2.5, limit=0.1, limit_shared=0.0)
    for p in block.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    reference = moe.MoE(H, inter, E, 2, 8, scale=2.5, limit=0.1, limit_shared=0.0)
    reference.load_state_dict(block.state_dict())
    reference.prepare(use_kernel=False)
    monkeypatch.setattr(moe, "fused_moe_kernel", lambda: fake_fused_moe)
    block.prepare(use_kernel=True)
    x = torch.randn(2, 5, H, generator=g)
    torch.testing.assert_close(block(x), reference(x), rtol=1e-5, atol=1e-5)
    assert seen == {"gate": (E, inter, H), "contiguous": True}
