"""advisor.engine.model.vision against transformers' Step3p7 vision tower + projector, on checkpoints written by save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from advisor.engine.model.vision import StepVision, VisionConfig, build_vision, load_vision, vision_keys
from advisor.engine.text.image_processing import ImageProcessorConfig, preprocess
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skdata

from tests.engine.step_models import TEXT_B, build_reference, rel_err, save_reference

# 112 px global view: an 8x8 ViT grid (no position interpolation) -> 2x2 tokens. The crops below
# are 84 px: a 6x6 grid, so positions are interpolated and RoPE runs on another grid.
VISION_1 = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=112, patch_size=14, mlp_ratio=2.0
)
# Three heads, the released (non-integer) MLP ratio, hub spellings (width/layers/heads) in the config.
VISION_2 = dict(width=48, layers=3, heads=3, image_size=84, patch_size=14, mlp_ratio=8960 / 1536)


def _reference(vision: dict, seed: int):
    model = build_reference(TEXT_B, seed=seed, vision=vision)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LayerScale and biases away from their inits, so each one matters
        for p in model.model.vision_model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    out = {}
    for name, vision, seed in (("v1", VISION_1, 0), ("v2", VISION_2, 1)):
        ref = _reference(vision, seed)
        out[name] = (ref, save_reference(ref, tmp_path_factory.mktemp(name)))
    return out


def _ours(path: Path, dtype: torch.dtype = torch.float32) -> StepVision:
    cfg = json.loads((path / "config.json").read_text())
    return load_vision(
        cfg["vision_config"],
        cfg["text_config"]["hidden_size"],
        load_file(path / "model.safetensors"),
        dtype=dtype,
    )


def _reference_features(ref, pv, pvl=None, counts=None) -> torch.Tensor:
    with torch.no_grad():
        out = ref.get_image_features(pv, pvl, counts).pooler_output
    return torch.cat(out)


def test_state_dict_keys_are_the_checkpoint_keys(ckpts):
    _, path = ckpts["v1"]
    on_disk = {
        k: tuple(v.shape)
        for k, v in load_file(path / "model.safetensors").items()
        if k.startswith(("vision_model.", "vit_large_projector."))
    }
    model = build_vision(
        json.loads((path / "config.json").read_text())["vision_config"], TEXT_B["hidden_size"]
    )
    assert vision_keys(model) == on_disk


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_global_views_match_reference(ckpts, name):
    ref, path = ckpts[name]
    size = ref.config.vision_config.image_size
    pv = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    want = _reference_features(ref, pv)
    got = _ours(path).image_features(pv)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-4


def test_global_and_local_crops_match_reference(ckpts):
    ref, path = ckpts["v1"]
    g = torch.Generator().manual_seed(3)
    pv = torch.randn(3, 3, 112, 112, generator=g)
    pvl = torch.randn(5, 3, 84, 84, generator=g)
    counts = [2, 0, 3]  # an image without crops in the middle keeps the slicing honest
    want = _reference_features(ref, pv, pvl, counts)
    ours = _ours(path)
    got = ours.image_features(pv, pvl, torch.tensor(counts))
    assert got.shape == (3 * 4 + 5 * 4, TEXT_B["hidden_size"])
    assert rel_err(got, want) < 1e-4
    # Order: image 0's two crops, then its global view.
    first = ours.image_features(pv[:1], pvl[:2], [2])
    assert rel_err(got[: first.shape[0]], first) < 1e-5


def test_real_image_through_preprocessing_matches_reference(ckpts):
    ref, path = ckpts["v1"]
    pcfg = ImageProcessorConfig.from_vision_config(VISION_1, crop_size=84)
    images = [Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.astronaut())]
    proc = preprocess(images, pcfg)
    # chelsea 451x300 -> 84 px windows on a 504x336 canvas; astronaut 512 px is first capped at 465.
    assert proc.num_local_patches == [6 * 4, 6 * 6]
    want = _reference_features(ref, proc.pixel_values, proc.pixel_values_local, proc.num_local_patches)
    got = _ours(path).image_features(proc.pixel_values, proc.pixel_values_local, proc.num_local_patches)
    assert got.shape[0] == proc.num_image_tokens
    assert sum(proc.token_text(i).count("<im_patch>") for i in range(2)) == got.shape[0]
    assert rel_err(got, want) < 1e-4


def test_bf16_weights_stay_close(ckpts):
    ref, path = ckpts["v1"]
    pv = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    got = _ours(path, dtype=torch.bfloat16).image_features(pv.bfloat16())
    assert got.dtype == torch.bfloat16
    assert rel_err(got, _reference_features(ref, pv)) < 5e-2


def test_hub_aliases_and_defaults():
    cfg = VisionConfig.from_dict(dict(width=48, layers=3, heads=3))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (48, 3, 3)
    released = VisionConfig.from_dict({})
    assert released.intermediate_size == int(1536 * (8960 / 1536))
    assert (released.tokens_per_side(728), released.tokens_per_side(504)) == (13, 9)
    with pytest.raises(ValueError, match="head_dim"):
        VisionConfig.from_dict(dict(width=30, heads=3))


def test_bad_checkpoint_tensors_are_named(ckpts):
    _, path = ckpts["v1"]
    cfg = json.loads((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    key = "vision_model.transformer.resblocks.1.attn.in_proj_weight"
    broken = {k: v for k, v in tensors.items() if k != key}
    with pytest.raises(ValueError, match=f"missing tensor {key}"):
        load_vision(cfg["vision_config"], TEXT_B["hidden_size"], broken)
    broken[key] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=rf"{key} has shape \[3, 3\], expected \[96, 32\]"):
        load_vision(cfg["vision_config"], TEXT_B["hidden_size"], broken)
    # Top-level downsampler keys (another export's spelling) land in the same parameters.
    moved = {k.removeprefix("vision_model."): v for k, v in tensors.items() if ".vit_downsampler" in k}
    moved.update({k: v for k, v in tensors.items() if ".vit_downsampler" not in k})
    model = load_vision(cfg["vision_config"], TEXT_B["hidden_size"], moved)
    assert torch.equal(
        model.vision_model.vit_downsampler2.bias, tensors["vision_model.vit_downsampler2.bias"]
    )


def test_mismatched_crop_counts_are_errors(ckpts):
    _, path = ckpts["v1"]
    ours = _ours(path)
    pv, pvl = torch.zeros(2, 3, 112, 112), torch.zeros(3, 3, 84, 84)
    with pytest.raises(ValueError, match="sums to 2 but pixel_values_local holds 3"):
        ours.image_features(pv, pvl, [1, 1])
    with pytest.raises(ValueError, match="1 entries for 2 images"):
        ours.image_features(pv, pvl, [3])
