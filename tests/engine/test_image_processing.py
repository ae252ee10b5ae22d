"""advisor.engine.text.image_processing against transformers' Step3p7ImageProcessor / Step3p7Processor logic, on real images.

torchvision cannot be installed beside our torch, so the reference processor's own orchestration
(`_plan_patches`, `_preprocess`: padding, views, tiling, grouping, newline masks) runs with its three
torchvision primitives (resize, pad, normalize) swapped for ours; those primitives are checked on
their own against PIL and the hand-written normalisation formula.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from advisor.engine.text.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    ImageProcessorConfig,
    image_token_ids,
    image_token_text,
    plan_patches,
    preprocess,
    resize_uint8,
)
from PIL import Image
from skimage import data as skdata

RELEASED = ImageProcessorConfig()


def _reference_processor():
    from transformers.models.step3p7.image_processing_step3p7 import Step3p7ImageProcessor

    proc = Step3p7ImageProcessor()
    # The torchvision primitives, replaced by ours (tested separately below).
    proc.resize = lambda image, size, resample=None, **kw: resize_uint8(image, size.height, size.width)

    def pad(images, pad_size, **kw):
        return [
            F.pad(im, (0, pad_size.width - im.shape[-1], 0, pad_size.height - im.shape[-2])) for im in images
        ]

    proc.pad = pad
    proc.normalize = lambda image, mean, std, inplace=False, **kw: (
        (image - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    )
    return proc


def _reference_preprocess(proc, images: list[Image.Image]):
    from transformers.image_utils import PILImageResampling

    tensors = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous() for im in images]
    return proc._preprocess(
        tensors,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=tuple(proc.image_mean),
        image_std=tuple(proc.image_std),
        resample=PILImageResampling.BILINEAR,
        size=proc.size,
        patch_size=proc.patch_size,
        disable_grouping=None,
        return_tensors=None,
    )


@pytest.mark.parametrize(
    ("size", "window", "cols", "rows", "canvas"),
    [
        ((3000, 2000), 504, 6, 4, (3024, 2016)),  # leftovers 480/488 > 20 % of 504: snap up
        ((1100, 800), 504, 2, 2, (1008, 1008)),  # 1100 leaves 92 < 100.8: snap down
        ((4000, 1000), 504, 6, 2, (3024, 1008)),  # capped at 3024 first (3024x756), ratio exactly 4
        ((3000, 500), 500, 6, 1, (3000, 500)),  # ratio 6 > 4: window = short side
        ((600, 300), 300, 2, 1, (600, 300)),  # fits the global view but elongated (ratio 2)
        ((451, 300), 300, 2, 1, (600, 300)),  # ratio 1.503: just elongated
        ((600, 400), 0, 0, 0, (600, 400)),  # ratio 1.5 exactly: global view only
        ((20, 200), 0, 0, 0, (200, 200)),  # degenerate: padded to 200x200, then global only
    ],
)
def test_patch_plans_by_hand(size, window, cols, rows, canvas):
    plan = plan_patches(*size, RELEASED)
    assert (plan.window, plan.cols, plan.rows, plan.crop_canvas) == (window, cols, rows, canvas)
    assert plan.square_pad == (size == (20, 200))


def test_patch_plans_match_reference_code():
    proc = _reference_processor()
    sizes = [
        (w, h)
        for w in (16, 30, 200, 333, 505, 727, 729, 1000, 1515, 2800, 5000)
        for h in (8, 31, 400, 990, 4096)
    ]
    for w, h in sizes:
        ref = proc._plan_patches(w, h, 728, 504)
        p = plan_patches(w, h, RELEASED)
        assert (p.global_size, p.crop_canvas, p.window, p.cols, p.rows, p.square_pad) == ref, (w, h)
        assert p.num_crops == proc.get_number_of_image_patches(h, w) or p.window == 0


def _real_images() -> list[Image.Image]:
    thin = Image.fromarray(skdata.astronaut()[:20, :, :])  # 512x20: square-padded
    return [
        Image.fromarray(skdata.chelsea()),  # 451x300 -> 2 crops of 300
        Image.fromarray(skdata.hubble_deep_field()),  # 1000x872 -> 2x2 crops, one newline
        thin,
        Image.fromarray(skdata.rocket()),  # 640x427: global only
    ]


def test_real_images_match_reference_preprocess():
    images = _real_images()
    ours = preprocess(images)
    ref = _reference_preprocess(_reference_processor(), images)
    assert ours.num_local_patches == list(ref["num_local_patches"]) == [2, 4, 0, 0]
    assert ours.pixel_values.shape == (4, 3, 728, 728)
    assert ours.pixel_values_local.shape == (6, 3, 504, 504)
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pixel_values_local, ref["pixel_values_local"], rtol=0, atol=1e-5)
    masks = [p.newline_mask + [False] * (4 - len(p.newline_mask)) for p in ours.plans]
    assert masks == ref["patch_newline_masks"]
    # The padded strip: its lower part is the zero fill, normalised.
    pad_value = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])
    torch.testing.assert_close(ours.pixel_values[2, :, -100:, :].mean(dim=(1, 2)), pad_value)


def test_normalisation_by_hand():
    # A 728x728 image is not resized: the global view is the normalised pixels themselves.
    rgb = np.array(Image.fromarray(skdata.astronaut()).resize((728, 728), Image.BILINEAR))
    out = preprocess(Image.fromarray(rgb))
    want = (rgb.astype(np.float64) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(out.pixel_values[0].permute(1, 2, 0).numpy(), want, atol=1e-5)
    assert out.pixel_values_local is None and out.num_local_patches == [0]


def test_resize_matches_pil_bilinear():
    rgb = skdata.astronaut()
    chw = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    for w, h in ((728, 728), (300, 200), (1000, 640)):  # up, down (antialiased) and mixed
        pil = np.array(Image.fromarray(rgb).resize((w, h), Image.BILINEAR)).astype(int)
        ours = resize_uint8(chw, h, w).permute(1, 2, 0).numpy().astype(int)
        diff = np.abs(pil - ours)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_modes_are_converted_like_the_reference():
    gray = preprocess(Image.fromarray(skdata.camera()))  # L mode -> three equal channels
    v = gray.pixel_values[0] * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    torch.testing.assert_close(v[0], v[1], atol=1e-5, rtol=0)
    # Fully transparent RGBA composites onto white.
    clear = Image.new("RGBA", (728, 728), (10, 200, 30, 0))
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(preprocess(clear).pixel_values[0].mean(dim=(1, 2)), white)
    arr = preprocess(skdata.chelsea())  # numpy input
    assert arr.num_local_patches == [2]
    with pytest.raises(TypeError, match="image 1: expected a PIL image"):
        preprocess([Image.fromarray(skdata.chelsea()), "cat.png"])
    with pytest.raises(ValueError, match="image 0: numpy images must be uint8"):
        preprocess(np.zeros((4, 4, 3), dtype=np.float32))


def test_token_text_matches_reference_processor():
    from transformers.models.step3p7.image_processing_step3p7 import Step3p7ImageProcessor
    from transformers.models.step3p7.processing_step3p7 import Step3p7Processor

    stride = Step3p7ImageProcessor.vision_patch_size * Step3p7ImageProcessor.downsampler_stride
    fake = SimpleNamespace(
        image_feature_placeholder="<im_patch>" * (Step3p7ImageProcessor.size["height"] // stride) ** 2,
        patch_feature_placeholder="<im_patch>" * (Step3p7ImageProcessor.patch_size // stride) ** 2,
    )
    images = _real_images()
    ours = preprocess(images)
    masks = [p.newline_mask + [False] * (4 - len(p.newline_mask)) for p in ours.plans]
    inputs = {"num_local_patches": ours.num_local_patches, "patch_newline_masks": masks}
    want = [Step3p7Processor.replace_image_token(fake, inputs, i) for i in range(len(images))]
    assert ours.token_texts() == want
    hubble = ours.token_text(1)
    assert hubble.count("<im_patch>") == 4 * 81 + 169 and hubble.count("<patch_newline>") == 1
    assert ours.num_image_tokens == (4 * 169) + 6 * 81


def test_token_ids_layout():
    ids = dict(
        zip(
            ["<im_patch>", "<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>"],
            range(6),
            strict=True,
        )
    )
    got = image_token_ids(2, [True, False], ids, image_tokens=4, crop_tokens=1)
    assert got == [3, 0, 4, 5, 3, 0, 4, 1, 0, 0, 0, 0, 2]
    assert image_token_text(0, image_tokens=2) == "<im_start><im_patch><im_patch><im_end>"
    with pytest.raises(ValueError, match="no id for <patch_newline>"):
        image_token_ids(1, [False], {k: v for k, v in ids.items() if k != "<patch_newline>"})


def test_configs_derive_sizes():
    released = ImageProcessorConfig.from_vision_config({"image_size": 728, "patch_size": 14})
    assert (released.image_size, released.crop_size, released.max_image_size) == (728, 504, 3024)
    assert (released.image_tokens, released.crop_tokens) == (169, 81)
    tiny = ImageProcessorConfig.from_vision_config({"image_size": 112, "patch_size": 14})
    assert (tiny.image_size, tiny.crop_size, tiny.image_tokens, tiny.crop_tokens) == (112, 56, 4, 1)
    hub = ImageProcessorConfig.from_preprocessor_config(
        {
            "size": {"height": 728, "width": 728},
            "patch_size": 504,
            "max_image_size": 2048,
            "image_mean": [0.5] * 3,
        }
    )
    assert (hub.max_image_size, hub.image_mean, hub.image_std) == (2048, (0.5, 0.5, 0.5), CLIP_STD)
