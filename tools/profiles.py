"""Per-model image budgets: the largest size a model can use, and what an image of a given size costs.

Sending more pixels than a model looks at only costs bandwidth, and every image costs prompt tokens,
so the ledger asks the target model's profile both questions before an image leaves the process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageCost:
    """Prompt tokens one image costs.

    `tokens` counts the image-feature tokens (the figures model cards quote: 169 for Step's 728 view);
    `markers` counts the wrapper tokens around them (start/end/newline), also billed as prompt tokens.
    """

    tokens: int
    markers: int = 0
    global_views: int = 1
    local_crops: int = 0

    @property
    def total(self) -> int:
        return self.tokens + self.markers


@dataclass(frozen=True)
class Step3p7Profile:
    """Step 3.7 Flash, following `transformers.models.step3p7.Step3p7ImageProcessor`.

    Every image becomes one 728x728 global view (13x13 = 169 tokens after the 14px ViT patches and
    two stride-2 downsamplers); large or elongated images add sliding 504x504 local crops (9x9 = 81
    tokens each). Images over 3024 px on the long side are scaled down by the model anyway.
    """

    name: str = "step3p7"
    image_size: int = 728
    patch_size: int = 504
    max_image_size: int = 3024
    stride: int = 14 * 4

    def fit(self, width: int, height: int, max_side: int | None = None) -> tuple[int, int]:
        limit = min(self.max_image_size, max_side or self.max_image_size)
        return _fit_long_side(width, height, limit)

    def plan(self, width: int, height: int) -> tuple[int, int, int]:
        """(window, patches_x, patches_y) exactly as the transformers processor plans them."""
        from advisor.engine.text.image_plan import plan_patches  # pure geometry, no torch

        p = plan_patches(width, height, self.image_size, self.patch_size, self.max_image_size)
        return (p.window, p.cols, p.rows) if p.window else (0, 0, 0)

    def cost(self, width: int, height: int) -> ImageCost:
        _, nx, ny = self.plan(width, height)
        crops = nx * ny
        per_view = (self.image_size // self.stride) ** 2
        per_crop = (self.patch_size // self.stride) ** 2
        newlines = max(0, ny - 1) if crops else 0
        return ImageCost(per_view + crops * per_crop, 2 + 2 * crops + newlines, 1, crops)


@dataclass(frozen=True)
class PatchProfile:
    """A generic patch-grid vision model: one token per `patch` x `patch` pixels, capped size.

    The defaults (28 px patches, 1536 px long side, about 1.2 MP) match common open VLMs; pass your
    own for another model.
    """

    name: str = "generic"
    patch: int = 28
    max_side: int = 1536
    max_pixels: int = 1_254_400

    def fit(self, width: int, height: int, max_side: int | None = None) -> tuple[int, int]:
        w, h = _fit_long_side(width, height, min(self.max_side, max_side or self.max_side))
        if w * h > self.max_pixels:
            s = math.sqrt(self.max_pixels / (w * h))
            w, h = max(1, int(w * s)), max(1, int(h * s))
        return w, h

    def cost(self, width: int, height: int) -> ImageCost:
        return ImageCost(math.ceil(width / self.patch) * math.ceil(height / self.patch), 2)


@dataclass(frozen=True)
class AnthropicProfile:
    """Claude models: long side up to 1568 px, about 1.15 MP, cost about width*height/750 tokens."""

    name: str = "anthropic"
    max_side: int = 1568
    max_pixels: int = 1_150_000

    def fit(self, width: int, height: int, max_side: int | None = None) -> tuple[int, int]:
        return PatchProfile("anthropic", 1, self.max_side, self.max_pixels).fit(width, height, max_side)

    def cost(self, width: int, height: int) -> ImageCost:
        return ImageCost(math.ceil(width * height / 750))


Profile = Step3p7Profile | PatchProfile | AnthropicProfile

PROFILES: dict[str, Profile] = {
    "step3p7": Step3p7Profile(),
    "generic": PatchProfile(),
    "anthropic": AnthropicProfile(),
}


def get_profile(profile: str | Profile) -> Profile:
    if not isinstance(profile, str):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown image profile '{profile}'; known: {', '.join(PROFILES)}") from None


def profile_for(model: str, provider: str | None = None) -> str:
    """The profile name for an endpoint: Step 3.x models by name, Claude by provider or name, else generic."""
    name = model.lower()
    if "step-3" in name or "step3" in name:
        return "step3p7"
    if provider == "anthropic" or "claude" in name:
        return "anthropic"
    return "generic"


def _fit_long_side(width: int, height: int, limit: int) -> tuple[int, int]:
    if max(width, height) <= limit:
        return width, height
    s = limit / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))
