"""Where the Step 3.7 image processor takes its views from: pure geometry, no torch.

Shared by `engine.image_processing` (which builds the pixel inputs) and `tools.profiles` (which
prices an image in tokens before it is sent), so both always agree on the number of crops.
"""

from __future__ import annotations

from dataclasses import dataclass


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
