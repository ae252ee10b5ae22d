"""Seeded task families with verifiable answers: `generate(family, seed, root) -> task dir`.

Each family writes `root/<family>-<seed>/task.yaml` plus its inputs (CSV/JSON files, PNG images); the
same (family, seed) always gives the same bytes. The answer is in the task's check; `spec(family, seed)`
returns it without writing anything (for training data). Build the shipped suite with
`python -m advisor.evals.families evals/suites/basic --per-family 8`.

Families:
- arithmetic: exact integer arithmetic too large to do in one's head (python tool).
- lookup: one value from a CSV table in the workspace (list_files, read_file).
- multistep: an order total from a price list and an order file, with a discount (read_file, python).
- vision: a tiny code label somewhere on a large generated image, or a count of red circles (crop, zoom).
- marks: a count of the coloured dots on a large generated image among grey outlines (find_regions: its
  OpenCV mark finder sees every dot and no outline, so a model that cannot read pixels can still solve it).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image, ImageDraw, ImageFont

ROLES = {
    "executor": {"endpoint": "flash", "effort": "low"},
    "frontier": {"endpoint": "frontier", "effort": "high"},
}


@dataclass
class TaskSpec:
    name: str
    goal: str
    answer: str
    tools: list[str]
    files: dict[str, bytes] = field(default_factory=dict)  # workspace files, name -> bytes
    images: dict[str, bytes] = field(default_factory=dict)  # input images, name -> PNG bytes
    check: dict = field(default_factory=dict)

    def task_yaml(self) -> dict:
        d: dict = {"name": self.name, "goal": self.goal, "tools": self.tools}
        if self.files or self.images:
            d["inputs"] = {k: list(v) for k, v in (("images", self.images), ("files", self.files)) if v}
        d.update(ROLES)
        d["check"] = {"type": "equals", "value": self.answer, **self.check}
        return d


def _rng(family: str, seed: int) -> random.Random:
    return random.Random(f"{family}:{seed}")


def arithmetic(seed: int) -> TaskSpec:
    r = _rng("arithmetic", seed)
    a, b, c = r.randint(10**5, 10**6), r.randint(10**4, 10**5), r.randint(10**7, 10**8)
    d, e = r.randint(97, 9973), r.randint(11, 99)
    expr = f"({a} * {b} - {c}) % {d} + {e}**3"
    answer = (a * b - c) % d + e**3
    goal = f"Compute {expr} exactly (use the python tool). Answer with the integer only."
    return TaskSpec(f"arithmetic-{seed:03d}", goal, str(answer), ["python"])


WORDS = (
    "amber basil cedar delta ember fjord garnet harbor indigo juniper kestrel lotus maple nectar onyx "
    "pepper quartz raven sable thistle umber velvet willow yarrow zephyr"
).split()


def _items(r: random.Random, n: int) -> list[dict]:
    names = r.sample([f"{a}-{b}" for a in WORDS for b in WORDS if a != b], n)
    return [
        {
            "sku": f"SKU{r.randint(1000, 9999)}{i:02d}",
            "name": nm,
            "price": f"{r.randint(100, 99999) / 100:.2f}",
            "stock": r.randint(0, 500),
        }
        for i, nm in enumerate(names)
    ]


def _csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def lookup(seed: int) -> TaskSpec:
    r = _rng("lookup", seed)
    items = _items(r, 60)
    target = r.choice(items)
    field_ = r.choice(["price", "stock"])
    goal = (
        f"The workspace has an inventory table. What is the {field_} of the item named '{target['name']}'? "
        "Answer with the number only."
    )
    return TaskSpec(
        f"lookup-{seed:03d}",
        goal,
        str(target[field_]),
        ["list_files", "read_file"],
        files={"inventory.csv": _csv(items)},
    )


def multistep(seed: int) -> TaskSpec:
    r = _rng("multistep", seed)
    items = _items(r, 40)
    lines = [{"sku": it["sku"], "qty": r.randint(1, 12)} for it in r.sample(items, r.randint(3, 6))]
    discount = r.choice([0, 5, 10, 15, 20])
    cents = sum(
        round(float(next(i for i in items if i["sku"] == ln["sku"])["price"]) * 100) * ln["qty"]
        for ln in lines
    )
    total = cents * (100 - discount) / 100 / 100  # exact: cents are integers
    order = {"order_id": f"ORD-{r.randint(10000, 99999)}", "discount_percent": discount, "lines": lines}
    goal = (
        "The workspace has prices.csv (unit prices by sku) and order.json. Compute the order total: the sum of "
        "qty x unit price over the lines, minus the order's discount percent. "
        "Answer with the total rounded to 2 decimals, number only."
    )
    return TaskSpec(
        f"multistep-{seed:03d}",
        goal,
        f"{total:.2f}",
        ["read_file", "python"],
        files={
            "prices.csv": _csv([{k: it[k] for k in ("sku", "name", "price")} for it in items]),
            "order.json": (json.dumps(order, indent=2) + "\n").encode(),
        },
    )


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _canvas(r: random.Random, w: int = 1200, h: int = 800) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (w, h), (246, 244, 238))
    d = ImageDraw.Draw(img)
    for _ in range(25):  # grey distractor shapes
        x, y, s = r.randint(0, w - 80), r.randint(0, h - 80), r.randint(20, 80)
        g = r.randint(150, 215)
        d.rectangle([x, y, x + s, y + s // 2], outline=(g, g, g), width=2)
    return img, d


def vision(seed: int) -> TaskSpec:
    r = _rng("vision", seed)
    img, d = _canvas(r)
    if seed % 2 == 0:  # a tiny code label: unreadable at the downscaled full view, easy after crop/zoom
        code = "".join(r.choice(string.ascii_uppercase.replace("O", "") + "23456789") for _ in range(4))
        x, y = r.randint(40, 1080), r.randint(40, 760)
        d.rectangle([x - 3, y - 2, x + 62, y + 12], outline=(60, 60, 60))
        d.text((x, y), f"ID {code}", fill=(30, 30, 30), font=ImageFont.load_default(size=10))
        goal = (
            "Somewhere on the image is a tiny boxed label 'ID ....' with a 4-character code. Find it (crop and "
            "zoom help) and answer with the 4 characters only."
        )
        return TaskSpec(
            f"vision-{seed:03d}",
            goal,
            code,
            ["crop", "zoom"],
            images={"image.png": _png(img)},
            check={"ignore_case": True},
        )
    n = r.randint(3, 9)
    placed: list[tuple[int, int]] = []
    while len(placed) < n + 6:  # n red circles and 6 blue ones, none touching
        x, y = r.randint(30, 1170), r.randint(30, 770)
        if all((x - a) ** 2 + (y - b) ** 2 > 60**2 for a, b in placed):
            placed.append((x, y))
    for i, (x, y) in enumerate(placed):
        rad = r.randint(8, 14)
        color = (210, 30, 30) if i < n else (40, 70, 200)
        d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=color)
    goal = "How many red circles are on the image? Blue circles do not count. Answer with the number only."
    return TaskSpec(f"vision-{seed:03d}", goal, str(n), ["crop", "zoom"], images={"image.png": _png(img)})


MARK_COLOURS = ((210, 30, 30), (40, 70, 200), (30, 150, 60), (230, 140, 20), (150, 40, 170), (20, 160, 170))


def marks(seed: int) -> TaskSpec:
    r = _rng("marks", seed)
    img, d = _canvas(r)
    n = r.randint(2, 12)
    placed: list[tuple[int, int]] = []
    while len(placed) < n:  # 60 px apart: the mark finder never merges two dots
        x, y = r.randint(30, 1170), r.randint(30, 770)
        if all((x - a) ** 2 + (y - b) ** 2 > 60**2 for a, b in placed):
            placed.append((x, y))
    for x, y in placed:
        rad = r.randint(8, 14)
        d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=r.choice(MARK_COLOURS))
    goal = "How many coloured dots are on the image? The grey outlines do not count. Answer with the number only."
    return TaskSpec(f"marks-{seed:03d}", goal, str(n), ["find_regions"], images={"image.png": _png(img)})


FAMILIES: dict[str, Callable[[int], TaskSpec]] = {
    "arithmetic": arithmetic,
    "lookup": lookup,
    "multistep": multistep,
    "vision": vision,
    "marks": marks,
}


def spec(family: str, seed: int) -> TaskSpec:
    if family not in FAMILIES:
        raise KeyError(f"unknown family '{family}' (known: {', '.join(FAMILIES)})")
    return FAMILIES[family](seed)


def generate(family: str, seed: int, root: Path, effort: str | None = None) -> Path:
    """Writes the task (task.yaml and inputs) under root/<name>/ and returns that folder. `effort` sets
    both roles' reasoning effort (default: executor low, frontier high)."""
    s = spec(family, seed)
    d = Path(root) / s.name
    d.mkdir(parents=True, exist_ok=True)
    for name, data in {**s.files, **s.images}.items():
        (d / name).write_bytes(data)
    task = s.task_yaml()
    if effort is not None:
        for role in ROLES:
            task[role] = {**task[role], "effort": effort}
    (d / "task.yaml").write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    return d


SUITE_DEFAULTS = {
    "escalation": {"after_failures": 2, "at": ["replan"], "mode": "advise", "max_consults": 3},
    "budget": {"max_usd": 0.5, "max_steps": 20, "max_wall_s": 300},
}


def build_suite(
    root: Path,
    per_family: int = 8,
    first_seed: int = 0,
    families: tuple[str, ...] | None = None,
    defaults: dict | None = None,
    effort: str | None = None,
) -> Path:
    """Generates per_family tasks of each family (default: all) under root/tasks/ and writes root/suite.yaml,
    with `defaults` (default `SUITE_DEFAULTS`) as the suite's task defaults."""
    root = Path(root)
    for fam in families or tuple(FAMILIES):
        if fam not in FAMILIES:
            raise KeyError(f"unknown family '{fam}' (known: {', '.join(FAMILIES)})")
        for seed in range(first_seed, first_seed + per_family):
            generate(fam, seed, root / "tasks", effort)
    suite = {
        "name": root.name,
        "tasks": ["tasks/*/task.yaml"],
        "defaults": SUITE_DEFAULTS if defaults is None else defaults,
        "strategies": {
            "advisor-takeover": {"base": "advisor", "escalation": {"mode": "takeover", "takeover_steps": 2}}
        },
    }
    header = (
        "# Generated by `python -m advisor.evals.families` (evals/families.py). Endpoints `flash` and `frontier` come\n"
        "# from --endpoints advisor.yaml, an advisor.yaml in your config directory, or an `endpoints:` block here.\n"
    )
    (root / "suite.yaml").write_text(header + yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    return root / "suite.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m advisor.evals.families", description="generate a seeded eval suite"
    )
    p.add_argument("out", type=Path)
    p.add_argument("--per-family", type=int, default=8)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: all)")
    p.add_argument("--defaults", type=Path, help="a YAML file of task defaults for suite.yaml")
    p.add_argument(
        "--effort", choices=("low", "medium", "high"), help="both roles' effort (default low/high)"
    )
    a = p.parse_args(argv)
    defaults = None
    if a.defaults is not None:
        if not a.defaults.is_file():
            print(f"advisor.evals.families: --defaults: no such file: {a.defaults}", file=sys.stderr)
            return 2
        defaults = yaml.safe_load(a.defaults.read_text(encoding="utf-8")) or {}
    families = tuple(f for f in a.families.split(",") if f)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(
            f"advisor.evals.families: --families: unknown {unknown} (known: {', '.join(FAMILIES)})",
            file=sys.stderr,
        )
        return 2
    print(build_suite(a.out, a.per_family, a.first_seed, families, defaults, a.effort))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
