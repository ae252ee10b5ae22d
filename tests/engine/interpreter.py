"""Runs a test file again in a fresh pytest subprocess with TRITON_INTERPRET=1.

TRITON_INTERPRET must be set before triton is first imported (kernels bind to the interpreter when they
are decorated), and setting it in the main pytest process would leak into every other test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_under_triton_interpreter(test_file: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(test_file).resolve())]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, f"interpreter suite failed (rc={r.returncode}):\n{tail}"
    assert " passed" in tail and "skipped" not in tail and "deselected" not in tail, tail
