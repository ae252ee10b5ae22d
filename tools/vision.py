"""Pure vision functions on PIL images: crop, zoom, draw boxes, and find regions worth zooming into.

Each takes a PIL image and returns a new one (or boxes); nothing here knows about ledgers or models,
so users' own agents can call them directly. Bad boxes raise `ToolError` with a one-line reason.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from advisor.tools.boxes import box_list, pixel_box
from advisor.tools.spec import ToolError
from PIL import Image

MAX_ZOOM_SIDE = 2048  # beyond this a zoom costs tokens without showing more
MAX_ZOOM_SCALE = 8.0
# Sasha Trubetskoy's "distinct colours", strongest first (RGB).
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (0, 0, 128),
    (255, 225, 25),
    (128, 128, 0),
]
REGION_KINDS = ("text", "cells", "elements", "objects", "all")


def crop(image: Image.Image, box: Sequence[float], coords: str = "pixel") -> Image.Image:
    """The part of `image` inside `box` ([x1, y1, x2, y2]), clamped and grown to at least 28 px."""
    return image.crop(pixel_box(box, image.size, coords))


def zoom(
    image: Image.Image,
    box: Sequence[float],
    coords: str = "pixel",
    scale: float = 2.0,
    max_side: int = MAX_ZOOM_SIDE,
) -> Image.Image:
    """Crop `box` and upsample it `scale` times (Lanczos); the long side is capped at `max_side`."""
    return zoom_box(image, pixel_box(box, image.size, coords), scale, max_side)[0]


def zoom_box(
    image: Image.Image, pbox: tuple[int, int, int, int], scale: float = 2.0, max_side: int = MAX_ZOOM_SIDE
) -> tuple[Image.Image, float]:
    """Zoom an already checked pixel box; returns the image and the scale actually applied."""
    if (
        isinstance(scale, bool)
        or not isinstance(scale, numbers.Real)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ToolError(f"zoom scale must be a positive number, got {scale!r}")
    if scale > MAX_ZOOM_SCALE:
        raise ToolError(
            f"zoom scale {scale:g} is above the maximum {MAX_ZOOM_SCALE:g}; zoom into a smaller box instead"
        )
    region = image.crop(pbox)
    if region.mode in ("1", "P", "PA"):  # palette and bilevel images only resample with NEAREST
        region = region.convert("RGBA" if region.mode == "PA" or "transparency" in region.info else "RGB")
    w, h = region.size
    applied = min(float(scale), max_side / max(w, h))
    size = (max(1, round(w * applied)), max(1, round(h * applied)))
    return region.resize(size, Image.Resampling.LANCZOS), applied


def bbox(
    image: Image.Image,
    boxes,
    labels: Sequence[str] | None = None,
    coords: str = "pixel",
    *,
    label_at: str = "above",
) -> Image.Image:
    """A copy of `image` with each box drawn in its own colour and labelled (by index when no labels).

    `label_at="left"` puts each tag left of its box's top corner, which keeps dense rows of boxes
    (text lines) readable; a tag goes inside the box when there is no room outside.
    """
    boxes = box_list(boxes)
    if labels is not None and len(labels) != len(boxes):
        raise ToolError(f"got {len(labels)} labels for {len(boxes)} boxes; give one label per box or none")
    if label_at not in ("above", "left"):
        raise ToolError(f"label_at must be above or left, got {label_at!r}")
    pboxes = [pixel_box(b, image.size, coords, min_side=1) for b in boxes]
    canvas = np.array(image.convert("RGB"))
    h, w = canvas.shape[:2]
    thick = max(2, round(max(w, h) / 400))
    font_scale = max(0.45, max(w, h) / 1400)
    font_thick = max(1, round(font_scale * 1.6))
    for i, (x1, y1, x2, y2) in enumerate(pboxes):
        colour = PALETTE[i % len(PALETTE)]
        cv2.rectangle(canvas, (x1, y1), (x2 - 1, y2 - 1), colour, thick, cv2.LINE_8)
        text = str(labels[i]) if labels is not None else str(i)
        if text:
            _draw_label(canvas, text, (x1, y1), colour, font_scale, font_thick, thick, label_at)
    return Image.fromarray(canvas)


def _draw_label(canvas: np.ndarray, text: str, at, colour, font_scale, font_thick, thick, where: str) -> None:
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), base = cv2.getTextSize(text, font, font_scale, font_thick)
    pad = 2
    tag_w, tag_h = tw + 2 * pad, th + base + 2 * pad
    x, y = at
    H, W = canvas.shape[:2]
    if where == "left" and x - thick // 2 - tag_w >= 0:
        left, top = x - thick // 2 - tag_w, min(max(0, y - thick // 2), max(0, H - tag_h))
    else:
        left = min(max(0, x - thick // 2), max(0, W - tag_w))
        top = y - thick // 2 - tag_h
        if top < 0:  # no room above the box: put the tag inside its top-left corner
            top = y + thick
    cv2.rectangle(canvas, (left, top), (left + tag_w, top + tag_h), colour, -1)
    ink = (0, 0, 0) if (0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]) > 140 else (255, 255, 255)
    cv2.putText(canvas, text, (left + pad, top + pad + th), font, font_scale, ink, font_thick, cv2.LINE_AA)


# ---- finding regions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    box: tuple[int, int, int, int]  # pixel [x1, y1, x2, y2)
    kind: str  # text | cell | element | object
    score: float = 1.0  # how rectangular / solid the region is, 0..1

    def as_dict(self) -> dict:
        return {"box": list(self.box), "kind": self.kind, "score": round(self.score, 3)}


def find_regions(image: Image.Image, kind: str = "all", max_regions: int = 50) -> list[Region]:
    """Candidate regions to zoom into, found with OpenCV (no model).

    kind: `text` (text lines: adaptive threshold, glyphs joined along the line), `cells` (table cells
    enclosed by ruling lines), `elements` (coloured chart marks: bars, points, legend swatches),
    `objects` (edge-based blobs, for photos), or `all` (cells, elements and text on documents and
    charts; objects on photographs).
    """
    if kind not in REGION_KINDS:
        raise ToolError(f"kind must be one of {', '.join(REGION_KINDS)}, got {kind!r}")
    if max_regions < 1:
        raise ToolError(f"max_regions must be at least 1, got {max_regions}")
    rgb = np.asarray(image.convert("RGB"))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if float(gray.mean()) < 110:  # light ink on a dark page: make ink dark
        gray = 255 - gray
    finders = {"text": _text_lines, "cells": _table_cells, "elements": _chart_elements, "objects": _objects}
    if kind == "all":  # text/cell finders only make noise on photographs
        kinds = ["objects"] if is_photo(image) else ["cells", "elements", "text"]
    else:
        kinds = [kind]
    found: list[Region] = []
    for k in kinds:
        found.extend(finders[k](rgb, gray))
    return _dedupe(found)[:max_regions]


def _ink(gray: np.ndarray) -> np.ndarray:
    """Dark-ink mask robust to uneven lighting."""
    h, w = gray.shape
    block = max(15, (min(h, w) // 20) | 1)
    return cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, block, 12)


def _rules(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = ink.shape
    horiz = cv2.morphologyEx(
        ink, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (max(12, w // 25), 1))
    )
    vert = cv2.morphologyEx(
        ink, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (1, max(12, h // 25)))
    )
    return horiz, vert


def _text_lines(rgb: np.ndarray, gray: np.ndarray) -> list[Region]:
    ink = _ink(gray)
    horiz, vert = _rules(ink)
    ink = cv2.subtract(ink, cv2.dilate(horiz | vert, np.ones((3, 3), np.uint8)))  # ruling lines are not text
    n, _, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    heights = stats[1:, cv2.CC_STAT_HEIGHT][
        (stats[1:, cv2.CC_STAT_AREA] >= 6) & (stats[1:, cv2.CC_STAT_HEIGHT] >= 4)
    ]
    if heights.size == 0:
        return []
    char_h = float(np.median(heights))
    # Join glyphs into words and words into lines (a space is under ~1.6 cap heights even in a
    # heading set larger than the body), but not across column gaps, which are wider.
    kw = max(3, int(round(char_h * 1.6)))
    joined = cv2.morphologyEx(ink, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (kw, 1)))
    contours, _ = cv2.findContours(joined, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        if h < 0.5 * char_h or h > 3.5 * char_h or w < 0.8 * char_h or cv2.contourArea(c) < 4:
            continue
        fill = float(np.count_nonzero(ink[y : y + h, x : x + w])) / (w * h)
        if fill < 0.05:
            continue
        pad = max(1, int(char_h * 0.15))
        box = (
            max(0, x - pad),
            max(0, y - pad),
            min(rgb.shape[1], x + w + pad),
            min(rgb.shape[0], y + h + pad),
        )
        out.append(Region(box, "text", min(1.0, fill * 2)))
    out.sort(key=lambda r: (r.box[1] // max(1, int(char_h)), r.box[0]))
    return out


def _table_cells(rgb: np.ndarray, gray: np.ndarray) -> list[Region]:
    _, ink = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    horiz, vert = _rules(ink)
    if cv2.countNonZero(horiz) == 0 or cv2.countNonZero(vert) == 0:
        return []
    grid = cv2.dilate(horiz | vert, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(255 - grid, connectivity=4)
    H, W = gray.shape
    out = []
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        if x == 0 or y == 0 or x + w >= W or y + h >= H:  # open to the border: outside the table
            continue
        if w < 8 or h < 8 or w * h > 0.9 * W * H:
            continue
        fill = area / float(w * h)
        if fill < 0.6:
            continue
        # The dilation ate one pixel of each side; give it back so the box meets the rules.
        out.append(Region((int(x) - 1, int(y) - 1, int(x + w) + 1, int(y + h) + 1), "cell", float(fill)))
    if len(out) < 2:  # one enclosed box is a frame (plot area, paper edge), not a table
        return []
    out.sort(key=lambda r: (r.box[1], r.box[0]))
    return out


def _chart_elements(rgb: np.ndarray, gray: np.ndarray) -> list[Region]:
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    mask = ((hsv[..., 1] > 70) & (hsv[..., 2] > 40)).astype(np.uint8) * 255
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    H, W = gray.shape
    out = []
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        if area < 25 or w < 3 or h < 3 or w * h > 0.8 * W * H:
            continue
        out.append(Region((int(x), int(y), int(x + w), int(y + h)), "element", area / float(w * h)))
    out.sort(key=lambda r: (r.box[0], r.box[1]))
    return out


def _objects(rgb: np.ndarray, gray: np.ndarray) -> list[Region]:
    """Closed edge contours at every nesting level (a face inside a helmet inside a suit), sized
    between 0.4% and half of the image, strongest (solid, large) first, near-duplicates merged."""
    blur = cv2.GaussianBlur(gray, (5, 5), 0)
    med = float(np.median(blur))
    edges = cv2.Canny(blur, int(max(0, 0.66 * med)), int(min(255, 1.33 * med) + 1))
    H, W = gray.shape
    k = max(3, min(H, W) // 100)
    edges = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    contours, _ = cv2.findContours(edges, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        if not (0.004 * H * W <= w * h <= 0.5 * H * W):
            continue
        solidity = min(1.0, cv2.contourArea(cv2.convexHull(c)) / float(w * h))
        out.append(Region((x, y, x + w, y + h), "object", solidity))
    out.sort(key=lambda r: -r.score * (r.box[2] - r.box[0]) * (r.box[3] - r.box[1]))
    return _dedupe(out, 0.6)


def is_photo(image: Image.Image) -> bool:
    """Photographs have thousands of colours even in a thumbnail; documents and charts a few hundred."""
    thumb = image.convert("RGB")
    thumb.thumbnail((128, 128))
    return thumb.getcolors(maxcolors=3000) is None


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _dedupe(regions: list[Region], thresh: float = 0.85) -> list[Region]:
    kept: list[Region] = []
    for r in regions:
        if all(iou(r.box, k.box) < thresh for k in kept):
            kept.append(r)
    return kept
