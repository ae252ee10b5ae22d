"""`python -m advisor.bench --proxy` runs end to end (its figures are printed, never asserted)."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_proxy_bench_prints_its_table():
    out = subprocess.run(
        [sys.executable, "-m", "advisor.bench", "--proxy", "--requests", "80", "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 40 |")]
    assert len(rows) == 4, out.stdout
    open_loop = [line for line in out.stdout.splitlines() if line.startswith("| proxied |")]
    assert len(open_loop) == 2, out.stdout
    for row in rows + open_loop:  # every request answered, none failed
        assert row.rstrip(" |").endswith(" 0"), row
