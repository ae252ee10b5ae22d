"""The decode roofline the engine bench prints: weight bytes a decode step must read."""

from types import SimpleNamespace

import pytest
from advisor.engine.bench import decode_step_bytes, paired_ratios


def _cfg(E=64, k=8):
    layer = lambda mlp: SimpleNamespace(num_heads=4, mlp=mlp)  # noqa: E731
    return SimpleNamespace(
        vocab_size=1000,
        hidden_size=64,
        head_dim=16,
        num_key_value_heads=2,
        n_routed_experts=E,
        num_experts_per_tok=k,
        share_expert_dim=32,
        moe_intermediate_size=24,
        intermediate_size=128,
        layers=[layer("dense"), layer("sparse"), layer("sparse")],
    )


def test_batch_one_reads_k_experts_and_a_batch_reads_the_distinct_ones():
    cfg = _cfg()
    expert = 3 * 64 * 24 * 4  # gate, up, down of one expert, fp32
    one, sixteen = decode_step_bytes(cfg), decode_step_bytes(cfg, batch=16)
    distinct = 64 * (1 - (1 - 8 / 64) ** 16)  # about 56.5 of 64
    assert sixteen - one == pytest.approx(2 * (distinct - 8) * expert)
    attn = 64 * (4 * 16 + 2 * 2 * 16 + 4) + 4 * 16 * 64
    fixed = 1000 * 64 + 3 * attn + 3 * 64 * 128 + 2 * (64 * 64 + 3 * 64 * 32)
    assert one == pytest.approx((fixed + 2 * 8 * 3 * 64 * 24) * 4)
    assert decode_step_bytes(cfg, itemsize=2) == pytest.approx(one / 2)


def test_paired_ratios_compare_neighbouring_runs():
    ref = [(1.0, 10.0), (1.0, 30.0), (1.0, 12.0)]  # the second pair ran while the machine was busy
    eng = [(0.5, 2.0), (0.5, 5.0), (0.5, 3.0)]
    assert paired_ratios(ref, eng, 1) == [4.0, 5.0, 6.0]
    assert paired_ratios(ref, eng, 0) == [2.0, 2.0, 2.0]
