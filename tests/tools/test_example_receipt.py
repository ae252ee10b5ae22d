"""The receipt-total example: its image, its answer and its tool list stay consistent."""

import importlib.util
from pathlib import Path

import numpy as np
import yaml
from advisor.tools.images import ImageLedger
from advisor.tools.registry import resolve
from advisor.tools.vision import find_regions
from PIL import Image

from advisor.endpoints.base import EndpointConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "receipt-total"


def _generator():
    spec = importlib.util.spec_from_file_location("make_receipt", EXAMPLE / "make_receipt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_task_file_is_consistent_with_the_generated_receipt():
    task = yaml.safe_load((EXAMPLE / "task.yaml").read_text())
    assert task["name"] == "receipt-total"
    assert {"goal", "inputs", "tools", "executor", "frontier", "check", "endpoints"} <= set(task)
    assert [s.name for s in resolve(task["tools"])] == ["crop", "zoom", "bbox", "python"]
    assert {task["executor"]["endpoint"], task["frontier"]["endpoint"]} <= set(task["endpoints"])
    for cfg in task["endpoints"].values():  # the same model the endpoints load, unknown keys rejected
        EndpointConfig.model_validate(cfg)
    png = EXAMPLE / task["inputs"]["images"][0]
    assert png.stat().st_size < 200_000

    receipt = _generator().build()
    assert task["check"] == {"type": "equals", "value": str(receipt.total)}
    assert receipt.total == receipt.subtotal + receipt.tax == sum(p for _, p in receipt.items) + receipt.tax
    # The committed image is what the seeded script makes (allowing for font-rasteriser drift).
    committed = np.asarray(Image.open(png).convert("L"), dtype=float)
    fresh = np.asarray(receipt.image.convert("L"), dtype=float)
    assert committed.shape == fresh.shape and np.abs(committed - fresh).mean() < 2.0


def test_the_total_line_is_findable_and_zoomable():
    led = ImageLedger()
    img_id = led.load(EXAMPLE / "receipt.png")
    image = led.get(img_id)
    lines = find_regions(image, kind="text", max_regions=200)
    # The TOTAL figure is set larger than the rest: it is the tallest text region right of centre.
    right = [r for r in lines if r.box[0] > image.width / 2]
    tallest = max(right, key=lambda r: r.box[3] - r.box[1])
    x1, y1, x2, y2 = tallest.box
    assert 0.6 * image.height < y1 < 0.8 * image.height  # below the items, above CASH/CHANGE
    ink = np.asarray(image.convert("L").crop(tallest.box)) < 100
    assert ink.mean() > 0.1  # it holds dark digits, not paper
    assert led.cost(img_id).tokens == 169 + 81 * 2  # 478x754 is elongated: global view + 2 crops
