"""Task attempts that never finished: their folders set aside under `.aborted/`, their spend read back.

A task folder without result.json was left by an attempt that did not finish (the process was killed, or
on Ray its worker or node died). Its trace is kept, moved to `<root>/.aborted/<group>/<task>-<stamp>`
(for an eval: OUT/.aborted/<strategy>/<task>-...; for `advisor run`: runs/.aborted/<run-id>/<task>-...),
and the calls it made were real spend: `spend` adds them up from its model_call events.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("executor", "frontier")
TOKEN_KINDS = ("input", "cached_input", "cache_write", "output", "reasoning")


def set_aside(d: Path) -> Path | None:
    """Moves the folder `d` (ROOT/GROUP/TASK) to ROOT/.aborted/GROUP/TASK-<stamp>; None when absent."""
    if not d.exists():
        return None
    dest = (
        d.parent.parent
        / ".aborted"
        / d.parent.name
        / (f"{d.name}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}")
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(d), dest)
    return dest


@dataclass
class Spend:
    """What a trace's model calls cost: calls, USD per role and in all, tokens per role."""

    model_calls: int = 0
    cost_usd: dict = field(default_factory=lambda: dict.fromkeys((*ROLES, "total"), 0.0))
    tokens: dict = field(default_factory=lambda: {r: dict.fromkeys(TOKEN_KINDS, 0) for r in ROLES})

    def add(self, event: dict) -> None:
        """Counts one event (only model_call events count)."""
        if event.get("type") != "model_call":
            return
        self.model_calls += 1
        role = event.get("role", "executor")
        cost = float(event.get("cost_usd") or 0.0)
        self.cost_usd[role] = self.cost_usd.get(role, 0.0) + cost
        self.cost_usd["total"] += cost
        usage = event.get("usage") or {}
        for k in TOKEN_KINDS:
            self.tokens.setdefault(role, dict.fromkeys(TOKEN_KINDS, 0))[k] += int(usage.get(k, 0))

    def __add__(self, other: Spend) -> Spend:
        out = Spend(self.model_calls + other.model_calls)
        for role in (*ROLES, "total"):
            out.cost_usd[role] = self.cost_usd.get(role, 0.0) + other.cost_usd.get(role, 0.0)
        for role in ROLES:
            for k in TOKEN_KINDS:
                out.tokens[role][k] = self.tokens[role][k] + other.tokens[role][k]
        return out


def spend(events: list[dict]) -> Spend:
    s = Spend()
    for ev in events:
        s.add(ev)
    return s
