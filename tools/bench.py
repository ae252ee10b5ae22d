"""How long the tools take: `python -m advisor.tools.bench` (CPU; median of several runs each).

Not a test: the figures depend on the machine. Vision timings are on a 2000x1500 upscaled photo and
on synthetic documents; the python tool figure is the whole call (process start to result).
`python -m advisor.tools.bench sandbox` prints only the sandbox table: the wall time a `shell` and a
`python` call take in each sandbox mode (bwrap with its seccomp filter, limits, none), side by side,
and what each adds over the same program started bare (no launcher, no confinement).
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


def _median(values: list[float]) -> float:
    return statistics.median(values)


def sandbox_table(runs: int = 15) -> None:
    """Wall time per shell and python call in each sandbox mode, and what it adds over a bare start."""
    import os
    import shutil
    import subprocess
    import sys

    from advisor.tools import confine
    from advisor.tools.commands import Limits, run_command
    from advisor.tools.sandbox import _LAUNCHER, run_python_async

    ws = Path(tempfile.mkdtemp(prefix="advisor-bench-"))
    os.chmod(ws, 0o755)  # limits mode as root runs as another uid, which must reach the workspace
    shell_cmd, py_code = "true", "pass"
    script = ws / ".bench_cell.py"
    script.write_text(py_code)

    async def bare_shell():
        p = await asyncio.create_subprocess_exec(
            shutil.which("bash") or "/bin/sh", "-c", shell_cmd, cwd=ws,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await p.communicate()

    async def bare_python():
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-E", "-s", "-c", _LAUNCHER, str(script), cwd=ws,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        await p.wait()

    async def run() -> None:
        cases = {("bare", "shell"): bare_shell, ("bare", "python"): bare_python}
        skipped: dict[tuple[str, str], str] = {}
        for mode in ("bwrap", "limits", "none"):

            async def sh(mode: str = mode):
                r = await run_command(shell_cmd, ws, sandbox=mode, limits=Limits(timeout_s=60))
                assert r.ok, r.stderr

            async def py(mode: str = mode):
                r = await run_python_async(py_code, ws, timeout_s=60, sandbox=mode)
                assert r.exit_code == 0, r.output

            for kind, fn in (("shell", sh), ("python", py)):
                try:
                    await fn()  # warm: the first call checks bwrap and builds the seccomp filter
                    cases[(mode, kind)] = fn
                except confine.SandboxUnavailable as e:
                    skipped[(mode, kind)] = str(e)
        # round-robin, so that a change in the machine's load touches every mode alike
        times: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
        for _ in range(runs):
            for key, fn in cases.items():
                t = time.perf_counter()
                await fn()
                times[key].append((time.perf_counter() - t) * 1000)
        ms = {k: _median(v) for k, v in times.items()}
        print(
            f"sandbox overhead, median of {runs} calls each, modes interleaved "
            f"(uid {os.geteuid()}, cgroups: {confine.cgroups_writable()})"
        )
        print(f"{'mode':<8} {'shell `true` ms':>16} {'added ms':>9} {'python `pass` ms':>17} {'added ms':>9}")
        for mode in ("bare", "bwrap", "limits", "none"):
            cols = []
            for kind, width in (("shell", 16), ("python", 17)):
                if (mode, kind) in ms:
                    added = "" if mode == "bare" else f"{ms[(mode, kind)] - ms[('bare', kind)]:.1f}"
                    cols.append(f"{ms[(mode, kind)]:{width}.1f} {added:>9}")
                else:
                    cols.append(f"{'skipped':>{width}} {'':>9}")
            print(f"{mode:<8} {' '.join(cols)}")
        for (mode, kind), why in skipped.items():
            print(f"  {mode} {kind} skipped: {why}")

    try:
        asyncio.run(run())
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def main() -> None:
    import sys

    if sys.argv[1:] == ["sandbox"]:
        sandbox_table()
        return
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

        (Path(ws) / "src.py").write_text(
            "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(2000))
        )
        search = lambda: asyncio.run(BUILTIN["search"].invoke({"pattern": r"x \+ 19\d\d"}, ctx))  # noqa: E731
        print(f"{'search, 6000-line file':<45} {_median_ms(search):8.1f} ms")
        edit = lambda: asyncio.run(  # noqa: E731
            BUILTIN["edit_file"].invoke({"path": "src.py", "insert_line": 3000, "new_text": "# note"}, ctx)
        )
        print(f"{'edit_file insert, 6000-line file':<45} {_median_ms(edit):8.1f} ms")
    print()
    sandbox_table()


if __name__ == "__main__":
    main()
