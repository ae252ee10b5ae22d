"""How long the tools take: `python -m advisor.tools.bench` (CPU; median of several runs each).

Not a test: the figures depend on the machine. Vision timings are on a 2000x1500 upscaled photo and
on synthetic documents; the python tool figure is the whole call (process start to result).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from advisor.tools import vision
from advisor.tools.images import ImageLedger
from advisor.tools.registry import BUILTIN
from advisor.tools.spec import ToolContext
from advisor.tools.testdata import make_receipt, make_table
from PIL import Image


def _median_ms(fn, runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((2000, 1500), Image.Resampling.BICUBIC)
    receipt = make_receipt(seed=1).image
    table = make_table(rows=8, cols=5).image
    rows = [
        ("crop 2000x1500 photo", lambda: vision.crop(photo, [300, 200, 1300, 900])),
        ("zoom x2 of 400x300", lambda: vision.zoom(photo, [300, 200, 700, 500], scale=2)),
        (
            "bbox 10 boxes on 2000x1500",
            lambda: vision.bbox(photo, [[i * 90, i * 60, i * 90 + 300, i * 60 + 200] for i in range(10)]),
        ),
        (
            f"find_regions text, receipt {receipt.width}x{receipt.height}",
            lambda: vision.find_regions(receipt, "text"),
        ),
        (f"find_regions all, table {table.width}x{table.height}", lambda: vision.find_regions(table, "all")),
        ("find_regions objects, 2000x1500 photo", lambda: vision.find_regions(photo, "objects")),
    ]
    for name, fn in rows:
        print(f"{name:<45} {_median_ms(fn):8.1f} ms")

    def encode_fresh():
        led = ImageLedger()
        led.encode(led.add(photo))

    print(f"{'encode 2000x1500 photo for step3p7':<45} {_median_ms(encode_fresh, 3):8.1f} ms")

    with tempfile.TemporaryDirectory() as ws:
        ctx = ToolContext(workspace=Path(ws))

        async def py(code: str) -> float:
            t = time.perf_counter()
            r = await BUILTIN["python"].invoke({"code": code}, ctx)
            assert not r.is_error, r.text
            return (time.perf_counter() - t) * 1000

        for label, code in [
            ("python tool: print(1)", "print(1)"),
            ("python tool: import numpy, cv2, PIL", "import numpy, cv2, PIL"),
        ]:
            ms = statistics.median(asyncio.run(py(code)) for _ in range(5))
            print(f"{label:<45} {ms:8.1f} ms")

        from advisor.tools.commands import bwrap_problem
        from advisor.tools.shell import ShellSettings

        (Path(ws) / "src.py").write_text(
            "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(2000))
        )
        for sandbox in ("limits", "bwrap"):
            if sandbox == "bwrap" and bwrap_problem():
                print(f"{'shell (bwrap)':<45} skipped: {bwrap_problem()}")
                continue
            sctx = ToolContext(workspace=Path(ws), extra={"shell": ShellSettings(sandbox=sandbox)})

            async def sh(command: str, sctx: ToolContext = sctx) -> float:
                t = time.perf_counter()
                await BUILTIN["shell"].invoke({"command": command}, sctx)
                return (time.perf_counter() - t) * 1000

            for label, command in [("true", "true"), ("python -c pass", "python3 -c pass")]:
                ms = statistics.median(asyncio.run(sh(command)) for _ in range(7))
                print(f"{f'shell ({sandbox}): {label}':<45} {ms:8.1f} ms")
        search = lambda: asyncio.run(BUILTIN["search"].invoke({"pattern": r"x \+ 19\d\d"}, ctx))  # noqa: E731
        print(f"{'search, 6000-line file':<45} {_median_ms(search):8.1f} ms")
        edit = lambda: asyncio.run(  # noqa: E731
            BUILTIN["edit_file"].invoke({"path": "src.py", "insert_line": 3000, "new_text": "# note"}, ctx)
        )
        print(f"{'edit_file insert, 6000-line file':<45} {_median_ms(edit):8.1f} ms")


if __name__ == "__main__":
    main()
