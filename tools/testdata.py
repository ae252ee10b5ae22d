"""Seeded synthetic documents with known ground truth: bar charts, ruled tables, receipts.

Tests use them to check `find_regions` against exact boxes, and the receipt-total example is made
with `make_receipt`. Fonts come from matplotlib's bundled DejaVu so the output does not depend on
the machine's fonts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

Box = tuple[int, int, int, int]


@cache
def font(size: int, mono: bool = False) -> ImageFont.FreeTypeFont:
    import matplotlib

    name = "DejaVuSansMono.ttf" if mono else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


@dataclass
class Chart:
    image: Image.Image
    values: list[float]
    labels: list[str]
    bar_boxes: list[Box]  # pixel [x1, y1, x2, y2) of each bar


def make_bar_chart(
    values: list[float], labels: list[str] | None = None, size=(640, 420), title: str = "Sales"
) -> Chart:
    """A matplotlib bar chart; each bar's pixel box is read back from the renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = labels or [f"Q{i + 1}" for i in range(len(values))]
    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.add_subplot()
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#e377c2", "#bcbd22"]
    bars = ax.bar(labels, values, color=[colours[i % len(colours)] for i in range(len(values))], width=0.6)
    ax.set_title(title)
    ax.set_ylabel("units")
    ax.grid(axis="y", color="#dddddd")
    ax.set_axisbelow(True)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    h = rgba.shape[0]
    boxes = []
    for bar in bars:
        ext = bar.get_window_extent()
        boxes.append((round(ext.x0), round(h - ext.y1), round(ext.x1), round(h - ext.y0)))
    return Chart(Image.fromarray(rgba[..., :3].copy()), list(values), labels, boxes)


@dataclass
class Table:
    image: Image.Image
    cells: list[list[str]]
    cell_boxes: list[Box]  # interior of each cell, row-major
    text_boxes: list[Box] = field(default_factory=list)  # ink box of each cell's text


def make_table(
    rows: int = 4, cols: int = 3, seed: int = 0, cell=(150, 44), line: int = 2, margin: int = 30
) -> Table:
    """A ruled table with random words and numbers; cell interiors are known exactly."""
    rng = random.Random(seed)
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "melon", "grape", "peach"]
    w = margin * 2 + cols * cell[0] + line
    h = margin * 2 + rows * cell[1] + line
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [margin + c * cell[0] for c in range(cols + 1)]
    ys = [margin + r * cell[1] for r in range(rows + 1)]
    for x in xs:
        d.rectangle([x, ys[0], x + line - 1, ys[-1] + line - 1], fill="black")
    for y in ys:
        d.rectangle([xs[0], y, xs[-1] + line - 1, y + line - 1], fill="black")
    f = font(16)
    cells, boxes, tboxes = [], [], []
    for r in range(rows):
        row = []
        for c in range(cols):
            text = rng.choice(words) if c == 0 else f"{rng.uniform(1, 999):.2f}"
            row.append(text)
            x0, y0 = xs[c] + line, ys[r] + line
            boxes.append((x0, y0, xs[c + 1], ys[r + 1]))
            tx, ty = x0 + 10, y0 + (cell[1] - line - 16) // 2
            d.text((tx, ty), text, fill="black", font=f)
            tboxes.append(tuple(int(v) for v in d.textbbox((tx, ty), text, font=f)))
        cells.append(row)
    return Table(img, cells, boxes, tboxes)


@dataclass
class Receipt:
    image: Image.Image
    items: list[tuple[str, Decimal]]
    subtotal: Decimal
    tax: Decimal
    total: Decimal
    line_boxes: list[Box]  # ink box of every printed line (before any photo effects)


def _money(x: Decimal) -> Decimal:
    return x.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def make_receipt(seed: int = 7, n_items: int = 9, photo: bool = True, font_size: int = 15) -> Receipt:
    """A shop receipt; with `photo` it is slightly rotated, shaded and noisy on a desk background."""
    rng = random.Random(seed)
    goods = ["MILK 1L", "BREAD RYE", "EGGS x12", "COFFEE BEANS", "BANANAS", "OLIVE OIL", "RICE 2KG", "TOMATOES",
             "CHEDDAR", "YOGURT", "PASTA", "APPLES", "BUTTER", "TEA GREEN", "HONEY", "ORANGES"]  # fmt: skip
    names = rng.sample(goods, n_items)
    items = [(n, _money(Decimal(rng.randint(89, 1899)) / 100)) for n in names]
    subtotal = _money(sum((p for _, p in items), Decimal(0)))
    tax = _money(subtotal * Decimal("0.0825"))
    total = subtotal + tax
    cash = _money(Decimal((int(total) // 10 + 1) * 10))
    f = font(font_size, mono=True)
    big = font(font_size + 7, mono=True)
    width_chars = 34
    char_w = f.getlength("M")
    paper_w = int(char_w * width_chars) + 60
    when = f"{rng.randint(1, 28):02d}/0{rng.randint(1, 9)}/2026  {rng.randint(8, 20):02d}:{rng.randint(0, 59):02d}"
    # (text, font, centred)
    lines: list[tuple[str, ImageFont.FreeTypeFont, bool]] = [
        ("GREEN LEAF MARKET", big, True),
        ("12 Harbour Road, Portsmith", f, True),
        (f"Tel 0{rng.randint(100, 999)} {rng.randint(100000, 999999)}", f, True),
        ("-" * width_chars, f, False),
        *((f"{name:<24}{price:>10}", f, False) for name, price in items),
        ("-" * width_chars, f, False),
        (f"{'SUBTOTAL':<24}{subtotal:>10}", f, False),
        (f"{'TAX 8.25%':<24}{tax:>10}", f, False),
        (f"{'TOTAL':<13}{total:>11}", big, False),
        (f"{'CASH':<24}{cash:>10}", f, False),
        (f"{'CHANGE':<24}{cash - total:>10}", f, False),
        ("", f, False),
        (when, f, True),
        ("THANK YOU FOR SHOPPING", f, True),
    ]
    paper_h = 40 + sum(int(fn.size * 1.55) for _, fn, _ in lines) + 40
    paper = Image.new("L", (paper_w, paper_h), 250)
    d = ImageDraw.Draw(paper)
    y = 40
    boxes = []
    for text, fn, centred in lines:
        x = (paper_w - fn.getlength(text)) / 2 if centred else 30
        if text:
            d.text((x, y), text, fill=25, font=fn)
            boxes.append(tuple(int(v) for v in d.textbbox((x, y), text, font=fn)))
        y += int(fn.size * 1.55)
    if not photo:
        return Receipt(paper.convert("RGB"), items, subtotal, tax, total, boxes)
    nrng = np.random.default_rng(seed)
    angle = rng.uniform(-2.0, 2.0)
    rotated = paper.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0)
    mask = Image.new("L", paper.size, 255).rotate(
        angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0
    )
    bg_w, bg_h = rotated.width + 120, rotated.height + 100
    yy, xx = np.mgrid[0:bg_h, 0:bg_w]
    desk = (95 + 25 * np.sin(xx / 170.0) + 10 * np.cos(yy / 230.0)).astype(np.float32)
    canvas = Image.fromarray(np.clip(desk, 0, 255).astype(np.uint8), "L")
    canvas.paste(rotated, (60, 45), mask)
    arr = np.asarray(canvas.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32)
    shade = 1.0 - 0.18 * (xx / bg_w) - 0.08 * (yy / bg_h)  # light falls off across the desk
    arr = arr * shade + nrng.normal(0, 3.0, arr.shape)
    # Few grey levels keep the PNG small without visible banding.
    arr = np.round(np.clip(arr, 0, 255) / 4) * 4
    return Receipt(
        Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L").convert("RGB"),
        items,
        subtotal,
        tax,
        total,
        boxes,
    )
