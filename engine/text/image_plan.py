"""Where the Step 3.7 image processor takes its views from, and the prompt tokens each image becomes:
pure geometry and text, no torch.

Shared by `advisor.engine.text.image_processing` (which builds the pixel inputs) and `advisor.tools.profiles` (which
prices an image in tokens before it is sent), and by `advisor.engine.text.chat`, so all agree on crops and layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

IMAGE_TOKEN = "<im_patch>"
IM_START, IM_END = "<im_start>", "<im_end>"
PATCH_START, PATCH_END, PATCH_NEWLINE = "<patch_start>", "<patch_end>", "<patch_newline>"
SPECIAL_TOKENS = (IMAGE_TOKEN, IM_START, IM_END, PATCH_START, PATCH_END, PATCH_NEWLINE)


@dataclass(frozen=True)
class PatchPlan:
    """Where one image's views come from (the reference's ``_plan_patches``)."""

    global_size: tuple[int, int]  # (width, height) before squaring to image_size
    crop_canvas: tuple[int, int]  # (width, height) the image is resized to before tiling
    window: int  # tile side on that canvas; 0 = no local crops
    cols: int
    rows: int
    square_pad: bool  # zero-pad to a square first (near-degenerate images)

    @property
    def num_crops(self) -> int:
        return self.cols * self.rows if self.window else 0

    @property
    def newline_mask(self) -> list[bool]:
        """After crop i, a ``<patch_newline>``? (row ends, except the last row)."""
        if not self.window:
            return []
        return [c == self.cols - 1 and r < self.rows - 1 for r in range(self.rows) for c in range(self.cols)]


def plan_patches(width: int, height: int, image_size: int, crop_size: int, max_image_size: int) -> PatchPlan:
    """The reference processor's ``_plan_patches``: global view size, crop canvas and tiling."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image has an empty side: {width}x{height}")
    square_pad = min(width, height) < 32 and max(width / height, height / width) > 4
    if square_pad:
        width = height = max(width, height)
    if max(width, height) > max_image_size:
        scale = max_image_size / max(width, height)
        width, height = int(width * scale), int(height * scale)
    short, long = min(width, height), max(width, height)
    if long <= image_size:
        window = short if long / short > 1.5 else 0
    elif long / short > 4:
        window = min(short, crop_size)
    else:
        window = crop_size
    if window == 0:
        return PatchPlan((width, height), (width, height), 0, 0, 0, square_pad)

    def snap(dim: int) -> int:
        # Round to a whole number of windows, up only when the leftover is over 20 % of a window.
        if dim < window:
            return dim
        return window * (dim // window + (dim % window > 0.2 * window))

    cw, ch = snap(width), snap(height)
    return PatchPlan(
        (width, height), (cw, ch), window, max(1, cw // window), max(1, ch // window), square_pad
    )


def _image_pieces(num_crops: int, newline_mask: Sequence[bool], image_tokens: int, crop_tokens: int):
    if len(newline_mask) < num_crops and newline_mask:
        raise ValueError(f"newline mask has {len(newline_mask)} entries for {num_crops} crops")
    for i in range(num_crops):
        yield PATCH_START, 1
        yield IMAGE_TOKEN, crop_tokens
        yield PATCH_END, 1
        if newline_mask and newline_mask[i]:
            yield PATCH_NEWLINE, 1
    yield IM_START, 1
    yield IMAGE_TOKEN, image_tokens
    yield IM_END, 1


def image_token_text(
    num_crops: int,
    newline_mask: Sequence[bool] = (),
    image_tokens: int = 169,
    crop_tokens: int = 81,
) -> str:
    """One image's prompt text: per crop ``<patch_start>`` + crop_tokens x ``<im_patch>`` + ``<patch_end>``
    (+ ``<patch_newline>`` where the mask says), then ``<im_start>`` + image_tokens x ``<im_patch>`` + ``<im_end>``.
    """
    return "".join(tok * n for tok, n in _image_pieces(num_crops, newline_mask, image_tokens, crop_tokens))


def image_token_ids(
    num_crops: int,
    newline_mask: Sequence[bool],
    special_ids: Mapping[str, int],
    image_tokens: int = 169,
    crop_tokens: int = 81,
) -> list[int]:
    """Same layout as :func:`image_token_text`, as ids; ``special_ids`` maps each special token to its id."""
    missing = [t for t in SPECIAL_TOKENS if t not in special_ids]
    if missing:
        raise ValueError(f"image token layout: tokenizer has no id for {', '.join(missing)}")
    ids: list[int] = []
    for tok, n in _image_pieces(num_crops, newline_mask, image_tokens, crop_tokens):
        ids.extend([int(special_ids[tok])] * n)
    return ids
