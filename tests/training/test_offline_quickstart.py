"""The README's main job, offline: `advisor run examples/quickstart/task.yaml` on the shipped embedded pair.
The executor alone fails the task; with the pair, the check rejects the executor's answer, the
conversation restarts from the goal with the frontier acting, and the task passes. Greedy decoding in fp32,
so the run is the same on every run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "examples" / "quickstart" / "task.yaml"


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict, list[dict]]:
    env = {
        k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")
    }  # no keys: it must not need them
    proc = subprocess.run(
        [sys.executable, "-m", "advisor.cli", "run", str(TASK), "--runs-dir", str(tmp_path), *extra],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    (result_file,) = tmp_path.rglob("result.json")
    events = [json.loads(line) for line in (result_file.parent / "trace.jsonl").read_text().splitlines()]
    return proc, json.loads(result_file.read_text()), events


def test_the_executor_alone_fails(tmp_path):
    proc, result, _ = _run(tmp_path, "--strategy", "executor")
    assert proc.returncode == 1 and result["outcome"] != "passed", proc.stdout[-2000:]


def test_a_consult_rescues_it(tmp_path):
    proc, result, events = _run(tmp_path)
    assert proc.returncode == 0 and result["outcome"] == "passed", proc.stdout[-2000:] + proc.stderr[-2000:]
    assert result["consults"] >= 1
    kinds = [e["type"] for e in events]
    first_consult = kinds.index("consult")
    assert "step_failed" in kinds[:first_consult]  # a real failure came first
    assert kinds[first_consult + 1] == "restart"
    answers = [e for e in events if e["type"] == "answer"]
    assert answers[-1]["by"] == "frontier" and answers[-1]["answer"] == result["answer"]
    cost = result["cost_usd"]
    assert 0 < cost["frontier"] and cost["total"] < cost["frontier_only_estimate"]
