"""Model presets, the initial checkpoint, the engine model made trainable, and saving in the Step layout.

The training run uses the engine's own modules (`advisor.engine.model.backbone.StepTextModel`: the same attention, MoE,
norms and RoPE as inference). The engine is written for inference, so `trainable` undoes three
inference-only choices for the duration of training:
- parameters are created with `requires_grad=False`: turned on (except the router's selection bias, which
  only picks experts and gets no gradient through `topk`);
- `RMSNorm` caches `1 + w` the first time it runs: the cache is dropped before every forward, so each
  step sees (and differentiates) the current weights;
- `experts_torch` picks its "loop" schedule for long inputs, whose `torch.mm(..., out=)` autograd refuses:
  training forces the "padded" schedule (batched matmuls, same maths).

Saving inverts the engine's `checkpoint_spec` (fused tensors are split back into the checkpoint's
q/k/v/g, gate/up parts), so what the engine loads is exactly what was trained.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import advisor.engine.model.moe
import torch
from advisor.engine.model.backbone import StepTextModel
from advisor.engine.model.config import load_config
from advisor.engine.model.layers import RMSNorm, rope_inv_freq
from advisor.engine.model.loader import Checkpoint, load_spec
from safetensors.torch import load_file, save_file

# Sliding and full attention, a dense first layer then MoE layers (shared expert, sigmoid router with a
# selection bias, top-k of n), head-wise gate in every attention layer (part of the Step attention).
PRESETS: dict[str, dict[str, Any]] = {
    "step-nano": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        moe_intermediate_size=128,
        n_routed_experts=8,
        num_experts_per_tok=2,
        share_expert_dim=128,
        sliding_window=128,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        moe_layers_enum="1,2,3",
        attention_other_setting={"num_attention_heads": 4, "num_attention_groups": 2},
        rope_theta=[1e5, 1e4, 1e4, 1e5],
        partial_rotary_factors=[0.5, 1.0, 1.0, 0.5],
        moe_router_scaling_factor=1.0,
        max_position_embeddings=8192,
    ),
    # About 3.5x step-nano's parameters (7.9M), 16 MB in bf16: wider, deeper, larger shared expert.
    "step-nano-large": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        moe_intermediate_size=128,
        n_routed_experts=8,
        num_experts_per_tok=2,
        share_expert_dim=256,
        sliding_window=256,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
        + ["sliding_attention", "full_attention"],
        moe_layers_enum="1,2,3,4,5",
        attention_other_setting={"num_attention_heads": 8, "num_attention_groups": 2},
        rope_theta=[1e5, 1e4, 1e4, 1e5, 1e4, 1e5],
        partial_rotary_factors=[0.5, 1.0, 1.0, 0.5, 1.0, 0.5],
        moe_router_scaling_factor=1.0,
        max_position_embeddings=8192,
    ),
}

# A tiny, untrained vision tower: the checkpoint carries the full Step3p7 layout, but the embedded
# endpoint sends no images to these models.
VISION: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14, mlp_ratio=2.0
)


def text_config(preset: str | dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    base = PRESETS[preset] if isinstance(preset, str) else preset
    cfg = copy.deepcopy(base)
    cfg.update(
        vocab_size=tokenizer.vocab_size,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return cfg


def init_checkpoint(path: Path, text: dict[str, Any], tokenizer_dir: Path, seed: int) -> Path:
    """A freshly initialised Step3p7ForConditionalGeneration (transformers' own init), saved in fp32,
    with the tokenizer files beside it."""
    from advisor.engine.text.tokenizer import load_tokenizer
    from transformers import Step3p7Config, Step3p7ForConditionalGeneration

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = Step3p7Config(
        text_config=copy.deepcopy(text),
        vision_config=copy.deepcopy(VISION),
        image_token_id=tok.require_id("<im_patch>"),
    )
    model = Step3p7ForConditionalGeneration(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(path)
    copy_tokenizer(tokenizer_dir, path)
    return path


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(src / name, dst / name)


def load_trainable(path: Path, device: str | torch.device = "cpu") -> StepTextModel:
    """The engine's text model with the checkpoint's weights in fp32, in checkpoint layout, trainable."""
    cfg = load_config(path)
    with torch.device("meta"):
        model = StepTextModel(cfg.text)
    ckpt = Checkpoint(path)
    try:
        load_spec(model, model.checkpoint_spec(), ckpt, torch.float32, torch.device(device))
    finally:
        ckpt.close()
    # finalize() would also re-lay weights for fast inference; training keeps the checkpoint layout.
    model.inv_freq = {t: rope_inv_freq(s, cfg.text.head_dim).to(device) for t, s in cfg.text.rope.items()}
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith("router_bias"))
    return model


@contextlib.contextmanager
def trainable(model: StepTextModel) -> Iterator[None]:
    """Run the engine model's forward so that backward works (see the module docstring)."""
    original = advisor.engine.model.moe.experts_torch
    advisor.engine.model.moe.experts_torch = functools.partial(original, schedule="padded")
    try:
        yield
    finally:
        advisor.engine.model.moe.experts_torch = original


def reset_norm_caches(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m._scale_of = None


def checkpoint_tensors(model: StepTextModel, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's weights under their checkpoint names and shapes (the inverse of `load_spec`)."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, (parts, dim) in model.checkpoint_spec().items():
        p = params[name].detach().cpu()
        if p.shape[dim] != sum(shape[dim] for _, shape in parts):
            raise ValueError(f"{name}: shape {list(p.shape)} does not match its checkpoint parts {parts}")
        pieces = torch.split(p, [shape[dim] for _, shape in parts], dim=dim) if len(parts) > 1 else (p,)
        for (key, shape), t in zip(parts, pieces, strict=True):
            want = torch.float32 if name.endswith(("router", "router_bias")) else dtype
            out[key] = t.reshape(shape).to(want).contiguous().clone()
    return out


def save_checkpoint(
    model: StepTextModel, init_dir: Path, out_dir: Path, dtype: torch.dtype = torch.float32
) -> Path:
    """config.json, model.safetensors (text weights trained, vision tower from `init_dir`), tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(model, dtype)
    for key, t in load_file(str(init_dir / "model.safetensors")).items():
        if key not in tensors:  # the vision tower and projector, untouched by text training
            tensors[key] = t.to(dtype) if t.is_floating_point() else t
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((init_dir / "config.json").read_text(encoding="utf-8"))
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if (init_dir / "generation_config.json").is_file():
        shutil.copy2(init_dir / "generation_config.json", out_dir / "generation_config.json")
    copy_tokenizer(init_dir, out_dir)
    return out_dir
