"""`python -m advisor.engine.build`: compiles the engine's CPU decode ops now, so the first model load does not.

The README's set-up runs it after `pip install`. One line says what happened: built (and how long it
took), already built, or unavailable here (no toolchain: the PyTorch path runs, and set-up goes on).
Exit code 1 only when a working toolchain fails on the ops' own source (a bug to report).
"""

from __future__ import annotations

import logging
import os
import sys
import time


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("ADVISOR_CPU_OPS_STRICT", "1")  # our source failing to build is an error here
    from advisor.engine.model import cpu_decode

    where = cpu_decode.build_directory()
    was_built = cpu_decode.is_built()
    start = time.perf_counter()
    try:
        ops = cpu_decode.ops()
    except cpu_decode.CpuOpsBuildError as e:
        print(f"advisor.engine.build: {str(e).splitlines()[0]} (compiler output above)", file=sys.stderr)
        return 1
    if ops is None:
        print("advisor.engine.build: CPU decode ops not built (see above); the engine runs its PyTorch path")
    elif was_built:
        print(f"advisor.engine.build: CPU decode ops already built in {where}")
    else:
        print(f"advisor.engine.build: CPU decode ops built in {time.perf_counter() - start:.0f} s ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
