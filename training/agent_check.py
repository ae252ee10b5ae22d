"""End-to-end check of a trained executor through the real Advisor loop: `advisor run` with provider embedded.

Writes held-out generated tasks as task folders (task.yaml with an equals check, the workspace files, and an
advisor.yaml whose `flash` endpoint is `provider: embedded` on the checkpoint, priced as Step 3.7 Flash),
runs them executor-only with `python -m advisor.cli run`, and summarises the results and traces: outcomes,
how many tool calls the loop received well-formed versus malformed, and why steps failed.

    python -m training.agent_check models/step-nano --n 6
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

from training.tasks import FAMILIES, ScriptedTask, generate

FLASH_PRICE = {"input": 0.20, "cached_input": 0.04, "output": 1.15}  # USD per million tokens


def write_task(task: ScriptedTask, root: Path, ckpt: Path, max_steps: int) -> Path:
    d = root / task.name
    d.mkdir(parents=True, exist_ok=True)
    for name, body in task.files.items():
        (d / name).write_text(body, encoding="utf-8")
    spec = {
        "name": task.name,
        "goal": task.goal,
        "tools": task.tools,
        "executor": {"endpoint": "flash", "effort": "low"},
        "check": {"type": "equals", "value": task.answer},
        "budget": {"max_steps": max_steps, "max_wall_s": 300},
    }
    if task.files:
        spec["inputs"] = {"files": sorted(task.files)}
    (d / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    endpoints = {
        "endpoints": {
            "flash": {
                "provider": "embedded",
                "model": str(ckpt.resolve()),
                "price": FLASH_PRICE,
                "max_tokens": 256,
            }
        }
    }
    (d / "advisor.yaml").write_text(yaml.safe_dump(endpoints, sort_keys=False), encoding="utf-8")
    return d / "task.yaml"


def summarise(runs_dir: Path) -> dict:
    outcomes: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for result in sorted(runs_dir.rglob("result.json")):
        r = json.loads(result.read_text(encoding="utf-8"))
        outcomes[r["outcome"]] += 1
        for trace in result.parent.glob("*.jsonl"):
            for line in trace.read_text(encoding="utf-8").splitlines():
                ev = json.loads(line)
                if ev.get("type") == "step_failed":
                    failures[str(ev.get("reason"))] += 1
                if ev.get("type") == "tool_result":
                    bad = str(ev.get("text", "")).startswith("error: malformed tool call")
                    calls["malformed" if bad else "well_formed"] += 1
                    if not bad and ev.get("is_error"):
                        calls["tool_error"] += 1
    return {
        "tasks": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "tool_calls": dict(calls),
        "failed_steps": dict(failures),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.agent_check")
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--seed", type=int, default=200_017)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--out", default="build/agent_check")
    p.add_argument("--max-steps", type=int, default=6)
    a = p.parse_args(argv)
    root = Path(a.out)
    tasks = list(generate(a.n, a.seed, tuple(a.families.split(","))))
    files = [write_task(t, root / "tasks", Path(a.checkpoint), a.max_steps) for t in tasks]
    runs = root / "runs"
    cmd = [sys.executable, "-m", "advisor.cli", "run", "--strategy", "executor", "--runs-dir", str(runs)]
    proc = subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True)
    summary = summarise(runs)
    summary["advisor_exit_code"] = proc.returncode
    if proc.returncode != 0 and not summary["tasks"]:
        summary["stderr_tail"] = proc.stderr[-2000:]
    print(json.dumps(summary, indent=1))
    return 0 if summary["tasks"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
