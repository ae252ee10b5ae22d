"""Images: vision tower + projector features placed at the <im_patch> positions, against the reference."""

from __future__ import annotations

import pytest
import torch
from advisor.engine import LLM

from tests.engine.step_models import TEXT_C, build_reference, rel_err, save_reference

VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=112, patch_size=14, mlp_ratio=2.0
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = build_reference(TEXT_C, seed=11, vision=VISION)
    return ref, LLM.from_pretrained(save_reference(ref, tmp_path_factory.mktemp("img") / "ckpt"))


def _ids(image_token: int, n_image_tokens: int) -> list[int]:
    return [5, 9, 17] + [image_token] * n_image_tokens + [33, 2, 40, 41]


def _tokens_per_view(side: int, patch: int = 14) -> int:
    g = side // patch
    for _ in range(2):  # two stride-2 downsampling convolutions
        g = (g + 1) // 2
    return g * g


@pytest.mark.parametrize("crops", [[0], [2], [3, 0]])
def test_image_logits_match_reference(pair, crops):
    ref, llm = pair
    g = torch.Generator().manual_seed(sum(crops) + len(crops))
    n_img = len(crops)
    pixel_values = torch.randn(n_img, 3, 112, 112, generator=g)
    local = torch.randn(sum(crops), 3, 84, 84, generator=g) if sum(crops) else None
    n_tokens = n_img * _tokens_per_view(112) + sum(crops) * _tokens_per_view(84)
    ids = torch.tensor([_ids(llm.config.image_token_id, n_tokens)])
    kwargs = dict(pixel_values=pixel_values, pixel_values_local=local, num_local_patches=crops)
    with torch.no_grad():
        want = ref(input_ids=ids, **kwargs).logits[0]
    got = llm.logits(ids[0], **kwargs)
    assert rel_err(got, want) < 1e-4
    # the image really matters
    assert rel_err(llm.logits(ids[0], **{**kwargs, "pixel_values": pixel_values + 1}), want) > 1e-3


def test_generate_with_an_image_matches_reference(pair):
    ref, llm = pair
    pixel_values = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    ids = _ids(llm.config.image_token_id, _tokens_per_view(112))
    img = {"pixel_values": pixel_values}
    got = llm.generate([ids, [3, 4, 5]], 16, stop_token_ids=[], images=[img, None])
    with torch.no_grad():
        want = ref.generate(
            torch.tensor([ids]),
            pixel_values=pixel_values,
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
        )[0, len(ids) :].tolist()
    assert got[0] == want
    assert got[1] == llm.generate([[3, 4, 5]], 16, stop_token_ids=[])[0]


def test_image_token_count_mismatch_is_a_clear_error(pair):
    _, llm = pair
    ids = _ids(llm.config.image_token_id, 3)
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        llm.logits(ids, pixel_values=torch.randn(1, 3, 112, 112))


def test_missing_vision_tensor_is_named(pair, tmp_path):
    import shutil

    from advisor.engine import CheckpointError
    from safetensors.torch import load_file, save_file

    _, llm = pair
    path = tmp_path / "ckpt"
    shutil.copytree(llm.path, path)
    tensors = load_file(path / "model.safetensors")
    del tensors["vit_large_projector.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"missing tensor vit_large_projector\.weight \(expected shape \[64, 128\]\)"
    ):
        LLM.from_pretrained(path)
