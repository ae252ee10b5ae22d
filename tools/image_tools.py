"""The vision tools as the model sees them: images named by ledger id, results added to the ledger."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from advisor.tools import vision
from advisor.tools.boxes import pixel_box
from advisor.tools.images import ImageLedger
from advisor.tools.spec import ToolContext, ToolError, ToolResult, tool
from pydantic import BeforeValidator, Field


def _json_list(value):
    """Small models often send a list as a string ("[10, 20, 30, 40]"); accept that form too."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _image_id(value):
    """Accept 0, "0" and "img0" for img_0; anything else is checked against the ledger later."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"img_{value}"
    if isinstance(value, str):
        v = value.strip()
        m = re.fullmatch(r"(?:img_?)?(\d+)", v)
        return f"img_{int(m.group(1))}" if m else v
    return value


CoordsArg = Literal["pixel", "norm1", "norm1000"]
ImageArg = Annotated[str, BeforeValidator(_image_id)]
BoxArg = Annotated[list[float], BeforeValidator(_json_list), Field(min_length=4, max_length=4)]
BoxesArg = Annotated[list[BoxArg], BeforeValidator(_json_list), Field(min_length=1)]
LabelsArg = Annotated[list[str] | None, BeforeValidator(_json_list)]


def ledger_of(ctx: ToolContext | None) -> ImageLedger:
    if ctx is None or ctx.images is None:
        raise ToolError("this task has no images (no image ledger in the tool context)")
    return ctx.images


def _produced(ledger: ImageLedger, new_id: str, extra: str = "") -> ToolResult:
    image = ledger.get(new_id)
    return ToolResult(
        text=ledger.describe(new_id) + extra, images=[(new_id, image)], data=ledger.info(new_id).as_dict()
    )


@tool(name="crop")
def crop_image(ctx: ToolContext, image: ImageArg, box: BoxArg, coords: CoordsArg = "pixel") -> ToolResult:
    """Cut out a region of an image to look at it on its own; the result is a new image id.

    Args:
        image: id of the image to crop, e.g. img_0
        box: [x1, y1, x2, y2], top-left and bottom-right corners
        coords: units of box: pixel, norm1 (0..1) or norm1000 (0..1000)
    """
    ledger = ledger_of(ctx)
    src = ledger.get(image)
    pbox = pixel_box(box, src.size, coords)
    new_id = ledger.add(src.crop(pbox), parent=image, box=pbox, op="crop")
    return _produced(ledger, new_id)


@tool(name="zoom")
def zoom_image(
    ctx: ToolContext, image: ImageArg, box: BoxArg, coords: CoordsArg = "pixel", scale: float = 2.0
) -> ToolResult:
    """Magnify a region of an image to read small text or details; the result is a new image id.

    Args:
        image: id of the image to zoom into, e.g. img_0
        box: [x1, y1, x2, y2] region to magnify
        coords: units of box: pixel, norm1 (0..1) or norm1000 (0..1000)
        scale: magnification, up to 8; the output's long side is capped at 2048 px
    """
    ledger = ledger_of(ctx)
    src = ledger.get(image)
    pbox = pixel_box(box, src.size, coords)
    out, applied = vision.zoom_box(src, pbox, scale)
    new_id = ledger.add(out, parent=image, box=pbox, op="zoom")
    note = f", scale {applied:.2f}" + (f" (capped from {scale:g})" if applied < scale - 1e-6 else "")
    return _produced(ledger, new_id, note)


@tool(name="bbox")
def draw_boxes(
    ctx: ToolContext,
    image: ImageArg,
    boxes: BoxesArg,
    labels: LabelsArg = None,
    coords: CoordsArg = "pixel",
) -> ToolResult:
    """Draw labelled boxes on a copy of an image to check where things are; the result is a new image id.

    Args:
        image: id of the image to draw on, e.g. img_0
        boxes: list of [x1, y1, x2, y2] boxes
        labels: one short label per box (default: the box's index)
        coords: units of the boxes: pixel, norm1 (0..1) or norm1000 (0..1000)
    """
    ledger = ledger_of(ctx)
    src = ledger.get(image)
    out = vision.bbox(src, boxes, labels, coords)
    w, h = src.size
    new_id = ledger.add(out, parent=image, box=(0, 0, w, h), op="bbox")
    return _produced(ledger, new_id, f", {len(boxes)} box(es) drawn")


@tool(name="find_regions")
def find_regions_tool(
    ctx: ToolContext,
    image: ImageArg,
    kind: Literal["text", "cells", "elements", "objects", "all"] = "all",
    max_regions: int = 30,
    draw: bool = True,
) -> ToolResult:
    """Find candidate regions (text lines, table cells, chart marks, objects) to crop or zoom into next.

    Args:
        image: id of the image to search, e.g. img_0
        kind: text (lines of text), cells (table cells), elements (coloured chart marks), objects (things in photos), or all (picks by image type)
        max_regions: most regions to return
        draw: also return a copy of the image with the regions drawn and numbered
    """
    ledger = ledger_of(ctx)
    src = ledger.get(image)
    regions = vision.find_regions(src, kind, max(1, min(max_regions, 200)))
    if not regions:
        what = "" if kind == "all" else f"{kind} "
        return ToolResult(text=f"no {what}regions found in {image}", data=[])
    lines = [f"{len(regions)} region(s) in {image} (pixel boxes [x1, y1, x2, y2]):"]
    lines += [f"r{i} {r.kind} {list(r.box)}" for i, r in enumerate(regions)]
    data = [r.as_dict() for r in regions]
    if not draw:
        return ToolResult(text="\n".join(lines), data=data)
    tags = [f"r{i}" for i in range(len(regions))]
    overlay = vision.bbox(src, [r.box for r in regions], tags, label_at="left")
    w, h = src.size
    new_id = ledger.add(overlay, parent=image, box=(0, 0, w, h), op="regions")
    lines.append(f"{new_id}: {image} with the regions drawn")
    return ToolResult(text="\n".join(lines), images=[(new_id, overlay)], data=data)
