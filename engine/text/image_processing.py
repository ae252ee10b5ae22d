"""Step 3.7 image preprocessing and prompt-side token layout, without torchvision.

Same steps as transformers' ``Step3p7ImageProcessor`` (torchvision backend) and ``Step3p7Processor``:
every image gives one square global view plus zero or more local crops chosen by a sliding window
whose size adapts to the aspect ratio. Resizes are bilinear with antialiasing on uint8 tensors, as
torchvision does on the CPU; then rescale + CLIP normalisation in float32.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from advisor.engine.text.image_plan import (  # noqa: F401 - re-exported: the image-token layout lives with the plan
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    PATCH_END,
    PATCH_NEWLINE,
    PATCH_START,
    SPECIAL_TOKENS,
    PatchPlan,
    image_token_ids,
    image_token_text,
)
from advisor.engine.text.image_plan import plan_patches as plan_geometry
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# The released model: 728 px global view, 504 px crops, images capped at 3024 px, ViT patch 14,
# two stride-2 downsamplers.
_RELEASED = dict(image_size=728, crop_size=504, max_image_size=3024, vision_patch_size=14)
_DOWNSAMPLE = 4


@dataclass(frozen=True)
class ImageProcessorConfig:
    image_size: int = 728  # global view side
    crop_size: int = 504  # local crop side (the reference calls it ``patch_size``)
    max_image_size: int = 3024
    vision_patch_size: int = 14
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_vision_config(cls, vision_config: Mapping[str, Any], **overrides: Any) -> ImageProcessorConfig:
        """Sizes for a vision tower: the released ones for a 728 px tower, else scaled to its image_size.

        Scaled crops keep the released 9:13 token ratio (at least one token), snapped to whole
        downsampled tokens so the feature count matches the token layout.
        """
        image_size = int(vision_config.get("image_size", 728))
        patch = int(vision_config.get("patch_size", 14))
        if image_size == _RELEASED["image_size"] and patch == _RELEASED["vision_patch_size"]:
            base = dict(_RELEASED)
        else:
            unit = patch * _DOWNSAMPLE
            tokens = max(1, (image_size // unit) * 9 // 13)
            base = dict(
                image_size=image_size,
                crop_size=tokens * unit,
                max_image_size=image_size * 54 // 13,
                vision_patch_size=patch,
            )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_preprocessor_config(cls, path: str | Path | Mapping[str, Any]) -> ImageProcessorConfig:
        """From a checkpoint's ``preprocessor_config.json`` (a path or its parsed dict)."""
        raw = path if isinstance(path, Mapping) else json.loads(Path(path).read_text())
        size = raw.get("size") or {}
        kw: dict[str, Any] = {}
        if "height" in size:
            kw["image_size"] = int(size["height"])
        for src, dst in (("patch_size", "crop_size"), ("max_image_size", "max_image_size")):
            if src in raw:
                kw[dst] = int(raw[src])
        if "vision_patch_size" in raw:
            kw["vision_patch_size"] = int(raw["vision_patch_size"])
        for k in ("image_mean", "image_std"):
            if k in raw:
                kw[k] = tuple(float(x) for x in raw[k])
        return cls(**kw)

    @property
    def image_tokens(self) -> int:
        """``<im_patch>`` count of a global view."""
        return _tokens_per_side(self.image_size, self.vision_patch_size) ** 2

    @property
    def crop_tokens(self) -> int:
        """``<im_patch>`` count of a local crop."""
        return _tokens_per_side(self.crop_size, self.vision_patch_size) ** 2


def _tokens_per_side(pixels: int, vision_patch: int) -> int:
    # ViT grid, then two pad-1 stride-2 convs (equal to pixels // (patch*4) for the released sizes).
    g = pixels // vision_patch
    for _ in range(2):
        g = (g - 1) // 2 + 1
    return g


def plan_patches(width: int, height: int, cfg: ImageProcessorConfig) -> PatchPlan:
    return plan_geometry(width, height, cfg.image_size, cfg.crop_size, cfg.max_image_size)


def _to_uint8_chw(image: Image.Image | np.ndarray, where: str) -> torch.Tensor:
    """RGB uint8 [3, H, W]; transparency is composited onto white, as the reference does."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise ValueError(f"{where}: numpy images must be uint8 HxW or HxWxC, got dtype {arr.dtype}")
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"{where}: numpy images must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
        if arr.shape[-1] == 4:
            image = Image.fromarray(arr, "RGBA")
        else:
            return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
    if not isinstance(image, Image.Image):
        raise TypeError(f"{where}: expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = image.convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def resize_uint8(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear + antialias on uint8 [..., 3, H, W] -> uint8, as torchvision's resize on the CPU."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    batched = images if images.dim() == 4 else images[None]
    out = F.interpolate(batched, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out if images.dim() == 4 else out[0]


def normalize(images: torch.Tensor, cfg: ImageProcessorConfig) -> torch.Tensor:
    """uint8 -> float32 (x/255 - mean) / std, fused like the reference: (x - 255 mean) / (255 std)."""
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(-1, 1, 1) * 255.0
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(-1, 1, 1) * 255.0
    return (images.float() - mean) / std


@dataclass
class ProcessedImages:
    """Model inputs for a list of images, in the meanings of ``Step3p7ForConditionalGeneration.forward``."""

    pixel_values: torch.Tensor  # [n_images, 3, image_size, image_size]
    pixel_values_local: torch.Tensor | None  # [sum(num_local_patches), 3, crop, crop] or None
    num_local_patches: list[int]
    plans: list[PatchPlan] = field(default_factory=list)
    config: ImageProcessorConfig = field(default_factory=ImageProcessorConfig)

    def token_text(self, index: int) -> str:
        """The prompt text replacing image ``index``'s placeholder."""
        plan = self.plans[index]
        return image_token_text(
            plan.num_crops, plan.newline_mask, self.config.image_tokens, self.config.crop_tokens
        )

    def token_texts(self) -> list[str]:
        """Every image's prompt text, in order (e.g. ``advisor.engine.text.chat.encode_chat(image_layouts=...)``)."""
        return [self.token_text(i) for i in range(len(self.plans))]

    def token_ids(self, index: int, special_ids: Mapping[str, int]) -> list[int]:
        plan = self.plans[index]
        return image_token_ids(
            plan.num_crops, plan.newline_mask, special_ids, self.config.image_tokens, self.config.crop_tokens
        )

    @property
    def num_image_tokens(self) -> int:
        """``<im_patch>`` positions all images fill (= rows of the vision features)."""
        c = self.config
        return len(self.plans) * c.image_tokens + sum(self.num_local_patches) * c.crop_tokens


def _views(
    img: torch.Tensor, cfg: ImageProcessorConfig
) -> tuple[PatchPlan, torch.Tensor, list[torch.Tensor]]:
    """One uint8 image -> (plan, global view uint8 [3,S,S], raw crops still at window size)."""
    _, h, w = img.shape
    plan = plan_patches(w, h, cfg)
    if plan.square_pad:
        side = max(w, h)
        img = F.pad(img, (0, side - w, 0, side - h))  # original at the top-left, zeros elsewhere
    gw, gh = plan.global_size
    glob = resize_uint8(resize_uint8(img, gh, gw), cfg.image_size, cfg.image_size)
    if not plan.window:
        return plan, glob, []
    cw, ch = plan.crop_canvas
    canvas = resize_uint8(img, ch, cw)
    win = plan.window
    crops = [
        canvas[:, y : y + win, x : x + win]
        for y in range(0, canvas.shape[1], win)
        for x in range(0, canvas.shape[2], win)
    ]
    return plan, glob, crops


def preprocess(
    images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
    cfg: ImageProcessorConfig | None = None,
) -> ProcessedImages:
    """PIL images (or uint8 arrays) -> global views, local crops and per-image crop counts."""
    cfg = cfg or ImageProcessorConfig()
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    if not images:
        raise ValueError("preprocess: no images given")
    plans, globs, crops, counts = [], [], [], []
    for i, image in enumerate(images):
        plan, glob, cs = _views(_to_uint8_chw(image, f"image {i}"), cfg)
        plans.append(plan)
        globs.append(glob)
        crops.extend(cs)
        counts.append(len(cs))
    pixel_values = normalize(torch.stack(globs), cfg)
    local = None
    if crops:
        # Crops of one image share a shape; resizing each alone equals the reference's batched resize.
        local = normalize(torch.stack([resize_uint8(c, cfg.crop_size, cfg.crop_size) for c in crops]), cfg)
    return ProcessedImages(pixel_values, local, counts, plans, cfg)
