"""Tiny random Step3p7 checkpoints, written by transformers' save_pretrained, for the engine's tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

# Sliding and full layers with different head counts, partial rotary + llama3 scaling on full layers,
# dense and MoE layers, clamps that actually bite, one MTP layer declared in the config.
TEXT_A: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=3,
    share_expert_dim=48,
    sliding_window=6,
    layer_types=[
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ],
    moe_layers_enum="1,3,4",
    num_nextn_predict_layers=1,
    attention_other_setting={"num_attention_heads": 8, "num_attention_groups": 2},
    rope_theta=[5e6, 1e4, 1e4, 5e6, 1e4],
    partial_rotary_factors=[0.5, 1.0, 1.0, 0.5, 1.0],
    rope_scaling={
        "rope_type": "llama3",
        "factor": 2.0,
        "original_max_position_embeddings": 16,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
    swiglu_limits=[0, 0.3, 0, 0.2, 0.2],
    swiglu_limits_shared=[0, 0, 0, 0.25, 0],
    moe_router_scaling_factor=3.0,
    pad_token_id=0,
)

# All full attention, one head count, full rotary, no clamps, no MTP, every layer MoE, top-1.
TEXT_B: dict[str, Any] = dict(
    vocab_size=200,
    hidden_size=96,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=3,
    head_dim=16,
    moe_intermediate_size=24,
    n_routed_experts=6,
    num_experts_per_tok=1,
    share_expert_dim=32,
    sliding_window=4096,  # the reference insists on one even without sliding layers
    layer_types=["full_attention"] * 3,
    mlp_layer_types=["sparse"] * 3,
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    moe_router_scaling_factor=1.0,
)

# Only sliding layers after the first, window 4, MHA (no grouping), layers 0-1 dense.
TEXT_C: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=32,
    moe_intermediate_size=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    share_expert_dim=16,
    sliding_window=4,
    layer_types=["full_attention"] + ["sliding_attention"] * 3,
    moe_layers_enum="2,3",
    attention_other_setting={"num_attention_heads": 4},
    rope_theta=[1e6, 1e4, 1e4, 1e4],
    partial_rotary_factors=[0.25, 0.5, 0.5, 0.5],
    moe_router_scaling_factor=2.0,
)

VISION: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14, mlp_ratio=2.0
)
IMAGE_TOKEN_ID = 250


def build_reference(text: dict[str, Any], seed: int = 0, vision: dict[str, Any] | None = None):
    """A Step3p7ForConditionalGeneration with weights random enough that every feature matters."""
    from transformers import Step3p7Config, Step3p7ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Step3p7Config(
        text_config=copy.deepcopy(text),
        vision_config=copy.deepcopy(vision or VISION),
        image_token_id=min(IMAGE_TOKEN_ID, text["vocab_size"] - 1),
    )
    model = Step3p7ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:  # zero-centred norms: w = 0 is the identity
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1]) ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def save_reference(model, path: Path, dtype: torch.dtype = torch.float32, **kwargs) -> Path:
    model.to(dtype).save_pretrained(path, **kwargs)
    model.to(torch.float32)
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def reference_experts(x, w_gate_up, w_down, topk_weights, topk_ids, swiglu_limit, implementation="eager"):
    """transformers' Step3p7Experts on the given weights (checkpoint layout: [E, 2I, H] and [E, H, I]).

    Built through Step3p7SparseMoeBlock from a config so that the limit reaches the experts however the
    installed transformers wires it: 5.24 passes `swiglu_limit=` to Step3p7Experts, 5.25 has it read
    `config.swiglu_limits[layer_idx]`. `implementation` is 5.25's config.experts_implementation (the full
    model defaults to grouped_mm there; 5.24's Step3p7Experts has only the eager path).
    """
    from transformers import Step3p7TextConfig
    from transformers.models.step3p7.modeling_step3p7 import Step3p7SparseMoeBlock

    E, H, inter = w_down.shape
    cfg = Step3p7TextConfig(
        hidden_size=H,
        n_routed_experts=E,
        moe_intermediate_size=inter,
        num_experts_per_tok=topk_ids.shape[1],
        share_expert_dim=inter,
        num_hidden_layers=1,
        swiglu_limits=[swiglu_limit],
        experts_implementation=implementation,
    )
    experts = Step3p7SparseMoeBlock(cfg, layer_idx=0).experts.to(x.dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w_gate_up)
        experts.down_proj.copy_(w_down)
        return experts(x, topk_ids, topk_weights)
