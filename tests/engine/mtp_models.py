"""Tiny random Step checkpoints with MTP layers (transformers' save_pretrained drops them: added here
under the published names, `model.layers.{N+j}.*`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tests.engine.step_models import TEXT_A, build_reference, save_reference

# TEXT_A (sliding window 6, MoE, clamps) with three MTP layers and a small vocabulary.
TEXT_MTP: dict[str, Any] = copy.deepcopy(TEXT_A)
TEXT_MTP.update(
    vocab_size=48,
    num_nextn_predict_layers=3,
    layer_types=TEXT_A["layer_types"] + ["sliding_attention"] * 2,
    rope_theta=TEXT_A["rope_theta"] + [1e4] * 2,
    partial_rotary_factors=TEXT_A["partial_rotary_factors"] + [1.0] * 2,
    swiglu_limits=TEXT_A["swiglu_limits"] + [0, 0],
    swiglu_limits_shared=TEXT_A["swiglu_limits_shared"] + [0, 0],
)


def add_mtp_layers(path: Path, seed: int = 0, scale: float = 1.0) -> Path:
    """Random MTP tensors for the checkpoint's config, written into its model.safetensors."""
    from advisor.engine.model.backbone import StepTextModel
    from advisor.engine.model.config import load_config

    cfg = load_config(path).text
    with torch.device("meta"):
        model = StepTextModel(cfg, with_mtp=True)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(path / "model.safetensors"))
    mtp_prefixes = tuple(f"model.layers.{cfg.num_hidden_layers + j}." for j in range(len(cfg.mtp_layers)))
    for keys, _ in model.checkpoint_spec().values():
        for key, shape in keys:
            if not key.startswith(mtp_prefixes):
                continue
            if len(shape) == 1:
                w = torch.randn(shape, generator=g) * 0.3
                if key.endswith("router_bias"):
                    w = w * 0.3
            else:
                w = torch.randn(shape, generator=g) * scale * (1.0 / shape[-1]) ** 0.5
            tensors[key] = w.contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def mtp_checkpoint(path: Path, seed: int = 0, text: dict[str, Any] | None = None) -> Path:
    ref = build_reference(text or TEXT_MTP, seed=seed)
    save_reference(ref, path)
    return add_mtp_layers(path, seed=seed + 1)
