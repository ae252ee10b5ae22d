"""A task's result: the result.json object, and report.md for a person."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from advisor.pricing import usd

Outcome = Literal["passed", "failed", "budget_exceeded", "error"]
OPTIONAL_KEYS = ("ray_node", "hostname", "aborted")


@dataclass
class TaskResult:
    task: str
    strategy: str
    outcome: Outcome
    answer: str | None = None
    error: str | None = None
    steps: int = 0
    consults: int = 0
    skipped_consults: int = 0
    consults_by_trigger: dict = field(
        default_factory=dict
    )  # consults made, by trigger: tool, failures, plan, ...
    model_calls: int = 0
    wall_s: float = 0.0
    tokens: dict = field(default_factory=dict)
    cost_usd: dict = field(default_factory=dict)
    out_dir: str | None = None
    workspace_diff: str | None = None  # unified diff of the workspace against its start, when it changed
    # where it ran, on a Ray cluster: the Ray node id and the worker's hostname (absent on a local run)
    ray_node: str | None = None
    hostname: str | None = None
    # attempts that died with their worker or node before this one: {attempts, model_calls, cost_usd,
    # tokens, traces}; their calls were real spend, booked here beside `cost_usd`, never in it
    aborted: dict | None = None

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("out_dir")
        for key in OPTIONAL_KEYS:  # a local run's result.json stays as it was
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TaskResult:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def write(self, out_dir: Path) -> None:
        """result.json is written atomically: its presence means the task finished."""
        tmp = out_dir / "result.json.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out_dir / "result.json")
        (out_dir / "report.md").write_text(render_report(self), encoding="utf-8")


def saved_usd(r: TaskResult) -> float | None:
    """What the run saved against the frontier model alone, or None when it solved nothing: a failed run's
    spend bought no result, so a "saving" beside it would mislead."""
    if r.outcome != "passed":
        return None
    return r.cost_usd.get("frontier_only_estimate", 0.0) - r.cost_usd.get("total", 0.0)
def _by_trigger(r: TaskResult) -> str:
    made = ", ".join(f"{t} {n}" for t, n in sorted(r.consults_by_trigger.items()))
    return f"; by trigger: {made}" if made else ""


def render_report(r: TaskResult) -> str:
    c = r.cost_usd
    saved = saved_usd(r)
    lines = [
        f"# {r.task}",
        "",
        f"- outcome: **{r.outcome}** (strategy: {r.strategy})",
        f"- answer: `{r.answer}`" if r.answer is not None else "- answer: none",
    ]
    if r.error:
        lines.append(f"- error: {r.error}")
    lines += [
        f"- steps: {r.steps}, consults: {r.consults} (skipped: {r.skipped_consults}{_by_trigger(r)}), model calls: {r.model_calls}",
        f"- wall time: {r.wall_s:.2f} s",
        *([f"- ran on Ray node {r.ray_node} ({r.hostname})"] if r.ray_node else []),
        "",
        "| role | input | cached input | cache write | output | reasoning | USD |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for role in ("executor", "frontier"):
        t = r.tokens.get(role, {})
        lines.append(
            f"| {role} | {t.get('input', 0)} | {t.get('cached_input', 0)} | {t.get('cache_write', 0)} | "
            f"{t.get('output', 0)} | {t.get('reasoning', 0)} | {usd(c.get(role, 0.0))} |"
        )
    lines += [
        "",
        f"Total: **{usd(c.get('total', 0.0))}**. The same tokens on the frontier model alone: "
        f"{usd(c.get('frontier_only_estimate', 0.0))} "
        + (f"(saved {usd(saved)})." if saved is not None else "(nothing saved: the task was not solved)."),
        "",
    ]
    if r.aborted:
        a = r.aborted
        lines += [
            f"Aborted attempts (a worker or node died): {a.get('attempts', 0)}, {a.get('model_calls', 0)} model "
            f"calls, {usd(a.get('cost_usd', 0.0))} spent on top of the total; their traces: "
            + ", ".join(a.get("traces") or []),
            "",
        ]
    if r.workspace_diff:
        lines += ["## Workspace changes", "", "```diff", r.workspace_diff.rstrip("\n"), "```", ""]
    return "\n".join(lines)
