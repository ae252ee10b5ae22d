"""Fused-MoE pieces that need no Triton launch: the token-to-expert alignment (PyTorch version), the tile
tables and the benchmark's no-GPU exit. The kernels' numbers are tested under the interpreter in
test_fused_moe.py; their sm_90 compile in test_fused_moe_sm90_compile.py."""

from __future__ import annotations

import json

import pytest
import torch
from advisor.engine.kernels import bench_moe, configs
from advisor.engine.kernels.align import max_padded_len, moe_align_block_size


def _check_alignment(ids: torch.Tensor, E: int, bm: int) -> None:
    al = moe_align_block_size(ids, E, bm)
    n = ids.numel()
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    total = int(al.num_tokens_post_padded.item())
    assert total == int(((counts + bm - 1) // bm * bm).sum())
    assert total % bm == 0 and al.sorted_ids.numel() == max_padded_len(n, E, bm) >= total
    assert al.sorted_ids.dtype == torch.int32 and al.block_expert.dtype == torch.int32
    assert al.block_expert.numel() == al.sorted_ids.numel() // bm
    # Every pair appears exactly once in the used part, the rest is the sentinel n.
    used = al.sorted_ids[:total]
    real = used[used < n]
    assert sorted(real.tolist()) == list(range(n))
    assert (al.sorted_ids[total:] == n).all()
    # Each block holds only pairs routed to that block's expert, in pair (token) order, and padding only at
    # the end of an expert's run; experts without pairs get no block.
    blocks_per_expert = torch.zeros(E, dtype=torch.long)
    for b in range(total // bm):
        e = int(al.block_expert[b])
        blocks_per_expert[e] += 1
        rows = al.sorted_ids[b * bm : (b + 1) * bm]
        members = rows[rows < n]
        assert (flat[members.long()] == e).all()
        assert members.tolist() == sorted(members.tolist())
        k = len(members)
        assert (rows[:k] < n).all() and (rows[k:] == n).all()
    assert torch.equal(blocks_per_expert, (counts + bm - 1) // bm)
    # Blocks past the used length name an expert that exists (the kernels never compute them).
    assert ((al.block_expert >= 0) & (al.block_expert < E)).all()


@pytest.mark.parametrize("T,k", [(1, 2), (5, 3), (33, 2), (64, 8)])
@pytest.mark.parametrize("bm", [1, 4, 16])
def test_alignment_groups_pairs_by_expert_in_padded_blocks(T, k, bm):
    E = 8
    g = torch.Generator().manual_seed(T * 100 + k * 10 + bm)
    # Experts 6 and 7 never get tokens (an expert with no pairs must get no block).
    ids = torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(T)]) if k <= 6 else None
    if ids is None:
        ids = torch.randint(0, 6, (T, k), generator=g)
    _check_alignment(ids, E, bm)


def test_alignment_of_a_single_hot_expert_and_of_no_tokens():
    ids = torch.full((20, 1), 3)
    al = moe_align_block_size(ids, 8, 16)
    assert int(al.num_tokens_post_padded) == 32
    assert al.block_expert[:2].tolist() == [3, 3]
    assert al.sorted_ids[:20].tolist() == list(range(20)) and (al.sorted_ids[20:32] == 20).all()
    empty = moe_align_block_size(torch.zeros((0, 2), dtype=torch.long), 8, 16)
    assert int(empty.num_tokens_post_padded) == 0 and empty.sorted_ids.numel() == 0


def test_alignment_rejects_bad_input():
    with pytest.raises(ValueError, match=r"topk_ids must be \[T, k\]"):
        moe_align_block_size(torch.zeros(4, dtype=torch.long), 8, 16)
    with pytest.raises(ValueError, match="block_m must be positive"):
        moe_align_block_size(torch.zeros(4, 2, dtype=torch.long), 8, 0)


def _entry(bm: int, bn: int) -> dict:
    gemm = {"BLOCK_N": bn, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": bm, "gate_up": gemm, "down": dict(gemm, BLOCK_N=2 * bn)}


def test_config_table_picks_the_nearest_batch_and_falls_back_to_the_heuristic(tmp_path, monkeypatch):
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    path = configs.config_path(8, 48, 32, torch.float16)
    assert path.name == "E8_N48_K32_fp16.json"
    path.write_text(json.dumps({"_source": "test", "1": _entry(16, 32), "64": _entry(64, 64)}))
    assert configs.get_config(1, 8, 2, 48, 32, torch.float16).BLOCK_M == 16
    assert configs.get_config(20, 8, 2, 48, 32, torch.float16).gate_up.BLOCK_N == 32
    big = configs.get_config(50, 8, 2, 48, 32, torch.float16)
    assert (big.BLOCK_M, big.down.BLOCK_N, big.down.num_stages) == (64, 128, 2)
    # Another dtype has no table: the heuristic, with tiles no wider than needed (>= 16 for tl.dot).
    fallback = configs.get_config(1, 8, 2, 48, 32, torch.float32)
    assert fallback == configs.default_config(1, 8, 2, 48, 32)
    assert fallback.BLOCK_M == 16 and fallback.gate_up.BLOCK_K == 32 and fallback.down.BLOCK_N == 32


def test_heuristic_grows_block_m_with_rows_per_expert():
    ms = [configs.default_config(t, 288, 8, 1280, 4096).BLOCK_M for t in (1, 64, 1024, 8192)]
    assert ms == sorted(ms) and ms[0] == 16 and ms[-1] == 64


def test_release_table_is_well_formed():
    table = configs.load_table(configs.config_path(288, 1280, 4096, torch.bfloat16))
    assert table is not None and {1, 8, 64} <= set(table)
    for cfg in table.values():
        for g in (cfg.gate_up, cfg.down):
            assert cfg.BLOCK_M >= 16 and g.BLOCK_N >= 16 and g.BLOCK_K >= 16


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "invalid JSON"),
        ('{"big": {}}', "expected a batch-size key"),
        ('{"1": {"BLOCK_M": 16, "gate_up": {"BLOCK_N": 32}, "down": {}}}', "gate_up: expected keys"),
        (
            '{"1": {"BLOCK_M": 16, "gate_up": {"BLOCK_N": 32, "BLOCK_K": 0}, "down": {}}}',
            "positive integers",
        ),
    ],
)
def test_malformed_table_is_a_one_line_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "E8_N48_K32_fp16.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        configs.load_table(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_bench_without_cuda_says_so_and_exits_zero(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_moe.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_bench_peak_bandwidth_by_device_name():
    assert bench_moe.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench_moe.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert bench_moe.peak_bandwidth("NVIDIA GeForce RTX 4090") is None
