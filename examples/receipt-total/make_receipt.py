"""Regenerate receipt.png for this example (seeded, so the image and the answer never drift).

python examples/receipt-total/make_receipt.py          # writes receipt.png, prints the total
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

from advisor.tools.testdata import Receipt, make_receipt  # noqa: E402

SEED = 2026
N_ITEMS = 13


def build() -> Receipt:
    return make_receipt(seed=SEED, n_items=N_ITEMS, photo=True, font_size=14)


def main() -> None:
    receipt = build()
    out = HERE / "receipt.png"
    receipt.image.convert("L").save(out, optimize=True)
    print(
        f"wrote {out.name} ({out.stat().st_size} bytes, {receipt.image.width}x{receipt.image.height}); total {receipt.total}"
    )


if __name__ == "__main__":
    main()
