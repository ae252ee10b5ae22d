"""Boxes from models: parse, scale, check, clamp and grow to something worth looking at.

Models emit boxes in pixels, in 0..1 or in 0..1000 (Qwen/Step style), and get them wrong in every
way; each mistake becomes a one-line `ToolError` the model can act on.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal

from advisor.tools.spec import ToolError

Coords = Literal["pixel", "norm1", "norm1000"]
MIN_SIDE = 28  # one ViT patch pair; smaller crops carry nothing a model can read
_SCALE = {"pixel": None, "norm1": 1.0, "norm1000": 1000.0}


def pixel_box(
    box: Sequence[float],
    size: tuple[int, int],
    coords: str = "pixel",
    min_side: int = MIN_SIDE,
) -> tuple[int, int, int, int]:
    """Integer pixel box [x1, y1, x2, y2) inside an image of `size` (width, height)."""
    if coords not in _SCALE:
        raise ToolError(f"coords must be one of pixel, norm1, norm1000, got {coords!r}")
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ToolError(f"box must be 4 numbers [x1, y1, x2, y2], got {box!r}") from None
    if len(vals) != 4:
        raise ToolError(f"box must be 4 numbers [x1, y1, x2, y2], got {len(vals)}: {_fmt(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise ToolError(f"box {_fmt(vals)} has a NaN or infinite value")
    w, h = size
    scale = _SCALE[coords]
    if scale is not None:
        top = max(abs(v) for v in vals)
        if top > scale * 1.5:
            hint = "norm1000 or pixel" if coords == "norm1" else "pixel"
            raise ToolError(
                f"box {_fmt(vals)} has values above {scale:g}, the range of coords={coords}; did you mean {hint}?"
            )
        vals = [vals[0] / scale * w, vals[1] / scale * h, vals[2] / scale * w, vals[3] / scale * h]
    x1, y1, x2, y2 = vals
    if x2 <= x1 or y2 <= y1:
        what = "empty" if (x2 == x1 or y2 == y1) else "inverted"
        raise ToolError(
            f"box {_fmt(box)} is {what}: need x1 < x2 and y1 < y2 ([x1, y1, x2, y2], coords={coords})"
        )
    if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
        raise ToolError(f"box {_fmt(box)} ({coords}) lies wholly outside the {w}x{h} image")
    ix1, iy1 = max(0, math.floor(x1)), max(0, math.floor(y1))
    ix2, iy2 = min(w, math.ceil(x2)), min(h, math.ceil(y2))
    ix1, ix2 = _grow(ix1, ix2, w, min_side)
    iy1, iy2 = _grow(iy1, iy2, h, min_side)
    return ix1, iy1, ix2, iy2


def box_list(boxes) -> list[Sequence[float]]:
    """Accept one box or a list of boxes (lists, tuples or numpy arrays)."""
    if hasattr(boxes, "tolist"):
        boxes = boxes.tolist()
    if isinstance(boxes, Sequence) and len(boxes) == 4 and all(isinstance(v, numbers.Real) for v in boxes):
        return [boxes]
    if not isinstance(boxes, Sequence) or isinstance(boxes, str) or not boxes:
        raise ToolError(f"boxes must be a non-empty list of [x1, y1, x2, y2], got {boxes!r}")
    return list(boxes)


def _grow(lo: int, hi: int, limit: int, min_side: int) -> tuple[int, int]:
    """Widen [lo, hi) about its centre to min_side, shifted to stay inside [0, limit)."""
    need = min(min_side, limit)
    if hi - lo >= need:
        return lo, hi
    lo = max(0, (lo + hi - need) // 2)
    hi = lo + need
    if hi > limit:
        lo, hi = limit - need, limit
    return lo, hi


def _fmt(vals) -> str:
    try:
        return "[" + ", ".join(f"{float(v):g}" for v in vals) + "]"
    except (TypeError, ValueError):
        return repr(vals)
