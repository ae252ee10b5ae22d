"""The compiled CPU decode ops: each gives what the PyTorch path gives, and is taken only where it applies."""

from __future__ import annotations

import pytest
import torch
from advisor.engine import LLM
from advisor.engine.model import cpu_decode
from advisor.engine.model.cache import KVCache
from advisor.engine.model.layers import RMSNorm
from advisor.engine.model.moe import MoE, block16, experts_torch, route, unblock16

from tests.engine.kernel_sets import KERNEL_SETS, kernel_set
from tests.engine.step_models import TEXT_A, TEXT_B, build_reference, save_reference

ops = cpu_decode.ops()
needs_ops = pytest.mark.skipif(ops is None, reason="no C++ toolchain: the PyTorch path runs instead")


def _close(got, want, tol=1e-5):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(want.abs().max().item(), 1e-6))


@needs_ops
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_the_pytorch_norm(residual, monkeypatch):
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(48, 1e-6)
    norm.weight.data = torch.randn(48, generator=g) * 0.3
    x, r = torch.randn(3, 5, 48, generator=g), torch.randn(3, 5, 48, generator=g)
    with torch.inference_mode():
        got = norm.add(x, r) if residual else (x, norm(x))
        monkeypatch.setitem(cpu_decode._state, "ops", None)
        want = norm.add(x, r) if residual else (x, norm(x))
    for a, b in zip(got, want, strict=True):
        _close(a, b)


@pytest.fixture(params=KERNEL_SETS)
def expert_kernels(request):
    """Which fp32 expert kernels run."""
    with kernel_set(ops, request.param, running=ops.experts_kernel) as name:
        yield name


@needs_ops
# 16 x 4 pairs on 16 experts: experts shared by tokens (register tiles of 1-6 tokens); 40 x 4: ten per
# expert; 300 x 4: 75 per expert, so experts and the shared expert split into tasks of 64 rows; 1100: two
# slices of at most 1024 tokens; hidden 40: no 16-wide tiles, the row-at-a-time loop.
@pytest.mark.parametrize(("tokens", "H"), [(1, 48), (2, 48), (16, 48), (40, 48), (300, 48), (1100, 48), (16, 40)])
@pytest.mark.parametrize("limit", [0.0, 0.5])
def test_experts_match_the_pytorch_experts(tokens, H, limit, expert_kernels):
    g = torch.Generator().manual_seed(tokens)
    E, inter, k, shared = 16, 24, 4, 20
    gu, dn = torch.randn(E, H, 2 * inter, generator=g), torch.randn(E, inter, H, generator=g)
    sgu, sdn = torch.randn(H, 2 * shared, generator=g), torch.randn(shared, H, generator=g)
    x = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    routed = experts_torch(x, gu, dn, w, ids, limit)
    _close(ops.decode_experts(x, gu, dn, w, ids, limit, None, None, 0.0), routed)
    a, b = (x @ sgu).chunk(2, dim=-1)
    a = torch.nn.functional.silu(a).clamp(max=0.3)
    want = routed + (a * b.clamp(-0.3, 0.3)) @ sdn
    _close(ops.decode_experts(x, gu, dn, w, ids, limit, sgu, sdn, 0.3), want)


@needs_ops
@pytest.mark.parametrize("tokens", [1, 3, 7, 16, 40, 200])
def test_blocked_experts_match_the_k_major_ones(tokens, expert_kernels):
    g = torch.Generator().manual_seed(tokens)
    E, H, inter, k, shared = 8, 48, 32, 2, 20
    gu, dn = (
        torch.randn(E, 2 * inter, H, generator=g),
        torch.randn(E, H, inter, generator=g),
    )  # checkpoint layout
    gu_t, dn_t = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
    gu_b, dn_b = block16(gu), block16(dn)
    assert torch.equal(unblock16(gu_b[3]), gu_t[3]) and torch.equal(unblock16(dn_b[5]), dn_t[5])
    sgu, sdn = torch.randn(H, 2 * shared, generator=g), torch.randn(shared, H, generator=g)
    x = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    want = experts_torch(x, gu_t, dn_t, w, ids, 0.5)
    _close(experts_torch(x, gu_b, dn_b, w, ids, 0.5), want)
    _close(ops.decode_experts(x, gu_b, dn_b, w, ids, 0.5, None, None, 0.0), want)
    with_shared = ops.decode_experts(x, gu_t, dn_t, w, ids, 0.5, sgu, sdn, 0.0)
    _close(ops.decode_experts(x, gu_b, dn_b, w, ids, 0.5, sgu, sdn, 0.0), with_shared)
    with pytest.raises(RuntimeError, match="expert weights .* do not match x"):
        ops.decode_experts(x, gu_b[:, :2].contiguous(), dn_b, w, ids, 0.5, None, None, 0.0)


@needs_ops
def test_the_router_picks_and_weighs_as_the_pytorch_router():
    g = torch.Generator().manual_seed(2)
    x, w, bias = (
        torch.randn(5, 32, generator=g),
        torch.randn(24, 32, generator=g),
        torch.randn(24, generator=g),
    )
    want_w, want_ids = route(x, w, bias, 6, 2.5)
    got_w, got_ids = ops.route(x, w, bias, 6, 2.5)
    order_want, order_got = want_ids.argsort(-1), got_ids.argsort(-1)
    assert torch.equal(want_ids.gather(1, order_want), got_ids.gather(1, order_got))
    _close(got_w.gather(1, order_got), want_w.gather(1, order_want))


def _moe() -> MoE:
    torch.manual_seed(0)
    m = MoE(
        hidden=32, inter=16, n_experts=8, top_k=2, shared_inter=12, scale=1.0, limit=7.0, limit_shared=0.5
    )
    for p in m.parameters():
        p.data = torch.randn_like(p) * 0.2
    m.prepare(use_kernel=False)
    return m


@needs_ops
def test_the_moe_block_takes_the_ops_where_their_kernel_is_fast(monkeypatch, expert_kernels):
    m = _moe()
    assert m.layout == "blocked"  # hidden 32, experts 16 wide: the 16 x 16 tiles
    calls = []

    class Counting:
        def __getattr__(self, name):
            fn = getattr(ops, name)
            return lambda *a: (calls.append((name, a[0].shape[0])) if a else None) or fn(*a)

    monkeypatch.setitem(cpu_decode._state, "ops", Counting())
    x = torch.randn(130, 32)
    with torch.inference_mode():
        one, four, many = m(x[:1]), m(x[:4]), m(x)
    # 2 and 8 pairs on 8 experts: the ops; 260 > 32 x 8: the ops with the AVX2 kernel only, else PyTorch
    assert calls == [("decode_moe", 1), ("decode_moe", 4)] + (
        [("decode_moe", 130)] if expert_kernels == "avx2" else []
    )
    monkeypatch.setitem(cpu_decode._state, "ops", None)
    with torch.inference_mode():
        _close(m(x[:1]), one)
        _close(m(x[:4]), four)
        _close(m(x), many)


def _decode_logits(llm, prompts, steps):
    """Left-padded batched prefill, then `steps` greedy decode steps: every step's logits, stacked."""
    model, T = llm.model, max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    pos = torch.arange(T) - torch.tensor([T - len(p) for p in prompts])[:, None]
    pos = pos.masked_fill(pos < 0, -1)
    cache = KVCache(llm.config.text, len(prompts), T + steps, llm.dtype, llm.device)
    out = []
    with torch.inference_mode():
        logits = model(model.embed_tokens(ids), cache.plan(pos), cache, last_only=True)
        last = pos.max(1, keepdim=True).values
        for s in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(model.embed_tokens(nxt), cache.plan(last + 1 + s), cache, last_only=True)
            out.append(logits[:, -1])
    return torch.stack(out), cache


# Head sizes the op holds in registers (16, 64, and 128 in passes of 3 heads: 10 and 8 query heads on 2 KV
# heads), and one it does not (24: the plain loops).
_HEADS = {
    "sliding+partial-rotary": TEXT_A,
    "full": TEXT_B,
    "head-64": dict(TEXT_A, head_dim=64),
    "head-128-passes": dict(TEXT_A, head_dim=128, num_attention_heads=10),
    "head-24-plain": dict(TEXT_A, head_dim=24),
}


@needs_ops
@pytest.mark.parametrize("text", list(_HEADS.values()), ids=list(_HEADS))
def test_decode_steps_through_the_ops_match_the_pytorch_path(text, tmp_path, monkeypatch):
    """Whole decode steps (attention with its cache writes and rings, norms, router, experts) with the ops
    and without: left-padded rows, past the sliding window."""
    llm = LLM.from_pretrained(save_reference(build_reference(text, seed=5), tmp_path / "ckpt"))
    prompts = [[5, 17, 33, 2, 99], [7, 7, 120, 64, 3, 101, 11, 9, 40], [42]]  # 3 x top-3 <= 2 x 8 experts
    calls = []

    class Counting:
        def __getattr__(self, name):
            fn = getattr(ops, name)
            return lambda *a: calls.append(name) or fn(*a)

    monkeypatch.setitem(cpu_decode._state, "ops", Counting())
    got, got_cache = _decode_logits(llm, prompts, 12)
    assert "decode_attention" in calls and "decode_moe" in calls
    monkeypatch.setitem(cpu_decode._state, "ops", None)
    want, want_cache = _decode_logits(llm, prompts, 12)
    _close(got, want, 1e-4)
    for a, b in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v, strict=True):
        _close(a, b, 1e-4)


def test_only_fp32_cpu_tensors_outside_autograd():
    w = torch.zeros(4, 8, 16)
    assert cpu_decode.usable(torch.zeros(1, 8), w)
    assert not cpu_decode.usable(torch.zeros(1, 8, requires_grad=True), w)
    assert not cpu_decode.usable(torch.zeros(1, 8, dtype=torch.bfloat16), w)
    d = torch.zeros(4, 8, 8)
    assert cpu_decode.experts_fit(128, w, d)
    assert not cpu_decode.experts_fit(2, w, d.transpose(1, 2))  # down not K-major contiguous


@needs_ops
def test_the_generic_expert_loops_take_32_pairs_per_expert_at_most(expert_kernels):
    w, d = torch.zeros(4, 8, 16), torch.zeros(4, 8, 8)
    assert cpu_decode.experts_fit(128, w, d)
    assert cpu_decode.experts_fit(129, w, d) == (expert_kernels == "avx2")


def test_they_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("ADVISOR_CPU_OPS", "0")
    assert cpu_decode._build() is None
