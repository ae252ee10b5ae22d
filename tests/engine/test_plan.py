"""The fit planner against figures computed by hand from the published Step 3.7 Flash config."""

from __future__ import annotations

import json

import pytest
from advisor.engine.plan import GiB, checkpoint_tensors, load_any_config, plan

N = 45
TEXT = {
    "model_type": "step3p5",
    "vocab_size": 128896,
    "hidden_size": 4096,
    "intermediate_size": 11264,
    "num_hidden_layers": N,
    "num_attention_heads": 64,
    "num_attention_groups": 8,
    "head_dim": 128,
    "moe_num_experts": 288,
    "moe_top_k": 8,
    "moe_intermediate_size": 1280,
    "share_expert_dim": 1280,
    "moe_layers_enum": ",".join(str(i) for i in range(3, N)),
    "num_nextn_predict_layers": 3,
    "sliding_window": 512,
    "layer_types": ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(N)]
    + ["sliding_attention"] * 3,
    "attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": 96},
    "rope_theta": [5e6 if i % 4 == 0 else 1e4 for i in range(N)] + [1e4] * 3,
    "partial_rotary_factors": [0.5 if i % 4 == 0 else 1.0 for i in range(N)] + [1.0] * 3,
    "moe_router_scaling_factor": 3.0,
}
VISION = {
    "hidden_size": 1536,
    "num_hidden_layers": 47,
    "num_attention_heads": 16,
    "image_size": 728,
    "patch_size": 14,
    "mlp_ratio": 8960 / 1536,
    "hidden_act": "quick_gelu",
}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    d = tmp_path_factory.mktemp("pub")
    (d / "config.json").write_text(
        json.dumps({"model_type": "step3p7", "text_config": TEXT, "vision_config": VISION})
    )
    cfg = load_any_config(d)
    return d, cfg, checkpoint_tensors(cfg)


def _by_hand():
    """Parameter counts of the published model, by hand: (experts, projections, everything else)."""
    H, V, D, KV, E, I, IS, DENSE = 4096, 128896, 128, 8, 288, 1280, 1280, 11264  # noqa: E741

    def attn(heads):
        return heads * D * H + 2 * KV * D * H + H * heads * D + heads * H  # q, k, v, o, g

    full = [i for i in range(N) if i % 4 == 0]
    assert len(full) == 12
    proj = sum(attn(64 if i % 4 == 0 else 96) for i in range(N))
    proj += 3 * 3 * H * DENSE  # dense layers 0-2
    proj += 42 * 3 * H * IS  # shared experts of the MoE layers 3-44
    proj += 3 * (attn(96) + 3 * H * DENSE)  # the three MTP layers' blocks (sliding attention, dense MLP)
    experts = 42 * 3 * E * I * H
    norms = (N + 3) * (2 * H + 2 * D) + H
    other = 2 * V * H + norms + 42 * (E * H + E)  # embeddings, head, norms, routers and biases
    other += 3 * (2 * H * H + 3 * H + V * H)  # MTP: eh_proj, enorm / hnorm / head norm, head
    W, L, M, P = 1536, 47, 8960, 14
    layer = (3 * W * W + 3 * W) + (W * W + W) + (2 * W * M + M + W) + 4 * W + 2 * W  # qkv, out, mlp, 2 LN, ls
    vision = 3 * P * P * W + (728 // P) ** 2 * W + 2 * W + L * layer
    vision += (W * 2 * W * 9 + 2 * W) + (2 * W * 4 * W * 9 + 4 * W) + 4 * W * H  # downsamplers, projector
    return experts, proj, other + vision


def test_parameter_counts_match_the_hand_count(published):
    _, cfg, shapes = published
    experts, proj, other = _by_hand()
    p = plan(cfg, "bf16", "h200", shapes=shapes)
    assert p.params == experts + proj + other
    assert p.weight_bytes == 2 * p.params
    assert plan(cfg, "nvfp4", "h200", shapes=shapes).quantized_params == experts
    assert plan(cfg, "fp8", "h200", shapes=shapes).quantized_params == experts + proj


def test_published_formats_on_one_h200(published):
    _, cfg, shapes = published
    experts, proj, other = _by_hand()
    h200 = 143771 * 2**20
    usable = int(h200 * 0.90)
    # the KV cache of one 32k context: 12 full layers x 32768 tokens + 33 sliding layers x 512, K and V of
    # 8 heads x 128 in bf16 (4 KiB per layer per token)
    per_layer_token = 2 * 8 * 128 * 2
    kv = 12 * per_layer_token * 32768 + 33 * per_layer_token * 512
    assert kv == 1_679_818_752  # 1.56 GiB
    bf16 = plan(cfg, "bf16", "h200", shapes=shapes)
    assert bf16.kv_per_seq == kv and not bf16.fits
    fp8 = plan(cfg, "fp8", "h200", shapes=shapes)
    n_exp_mats = 42 * 3 * 288
    scales_fp8 = 4 * n_exp_mats * (1280 // 128) * (4096 // 128)  # each expert matrix: 10 x 32 blocks
    assert fp8.weight_bytes > (experts + proj) + 2 * other + scales_fp8 - 1  # at least the codes, bf16 rest
    assert fp8.weight_bytes > usable and not fp8.fits  # ~192 GiB
    nvfp4 = plan(cfg, "nvfp4", "h200", shapes=shapes)
    want = experts // 2 + experts // 16 + 8 * n_exp_mats + 2 * (proj + other)
    assert nvfp4.weight_bytes == want
    assert nvfp4.fits and abs(want / GiB - 120.4) < 0.1
    assert nvfp4.max_seqs == (usable - want) // kv == 3  # three concurrent 32k contexts beside it
    int4 = plan(cfg, "int4", "h200", shapes=shapes)
    assert int4.fits and int4.max_seqs > nvfp4.max_seqs
    # at 8k contexts, more of them
    assert plan(cfg, "nvfp4", "h200", context=8192, shapes=shapes).max_seqs == (usable - want) // (
        12 * per_layer_token * 8192 + 33 * per_layer_token * 512
    )


def test_cpu_and_h100(published):
    _, cfg, shapes = published
    assert not plan(cfg, "nvfp4", "h100", shapes=shapes).fits
    assert plan(cfg, "int4", "cpu:128GiB", shapes=shapes).fits  # ~103 GiB of 115 usable
    assert not plan(cfg, "nvfp4", "cpu:128GiB", shapes=shapes).fits


def test_cli(published, capsys):
    from advisor.cli import main

    d, _, _ = published
    assert main(["engine", "plan", str(d), "--device", "h200", "--seqs", "3"]) == 0
    out = capsys.readouterr().out
    assert "nvfp4" in out and "nvfp4: 3 x 32768 tokens need" in out and "fits" in out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.split()[:1] in (["bf16"], ["fp8"], ["nvfp4"])
    }
    assert rows["bf16"][3] == "no" and rows["fp8"][3] == "no" and rows["nvfp4"][3:5] == ["yes", "3"]
    assert main(["engine", "plan", str(d), "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err
