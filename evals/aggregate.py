"""The numbers of an eval report, from task records: per strategy, per task, headline, consults, break-even."""

from __future__ import annotations

import math

from advisor.evals.records import ROLES, TOKEN_KINDS, TaskRecord

VOLUMES = (1_000, 10_000, 100_000)
BUILTIN_ORDER = ("executor", "frontier", "advisor", "advisor-tool", "combined")


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), as numpy's default; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def strategy_stats(recs: list[TaskRecord]) -> dict:
    n = len(recs)
    solved = sum(r.passed for r in recs)
    total = sum(r.cost["total"] for r in recs)
    tokens = {role: {k: sum(r.tokens[role][k] for r in recs) for k in TOKEN_KINDS} for role in ROLES}
    outcomes: dict[str, int] = {}
    for r in recs:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    walls = [r.wall_s for r in recs]
    return {
        "tasks": n,
        "solved": solved,
        "success_rate": _div(solved, n),
        "outcomes": outcomes,
        "total_usd": total,
        "executor_usd": sum(r.cost["executor"] for r in recs),
        "frontier_usd": sum(r.cost["frontier"] for r in recs),
        "frontier_only_estimate_usd": sum(r.cost["frontier_only_estimate"] for r in recs),
        "usd_per_task": _div(total, n),
        "usd_per_solved": _div(total, solved),
        "tokens": tokens,
        "latency_s": {"median": percentile(walls, 50), "p95": percentile(walls, 95)},
        "consults": sum(r.consults for r in recs),
        "consults_per_task": _div(sum(r.consults for r in recs), n),
        "consults_by_trigger": _by_trigger(recs),
        "model_calls": sum(r.model_calls for r in recs),
        "aborted_usd": sum(r.aborted_usd for r in recs),
        "aborted_model_calls": sum(r.aborted_calls for r in recs),
    }


def _by_trigger(recs: list[TaskRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in recs:
        for trigger, n in r.consults_by_trigger.items():
            out[trigger] = out.get(trigger, 0) + n
    return dict(sorted(out.items()))


def break_even(stats: dict[str, dict], volumes: tuple[int, ...] = VOLUMES) -> dict:
    """Monthly USD at each volume per strategy, and (with a frontier baseline) what each saves against it."""
    out: dict[str, dict] = {}
    base = stats.get("frontier", {}).get("usd_per_task")
    for name, s in stats.items():
        per = s["usd_per_task"] or 0.0
        row = {"usd_per_task": per, "monthly_usd": {str(v): per * v for v in volumes}}
        if base is not None and name != "frontier":
            row["monthly_savings_vs_frontier_usd"] = {str(v): (base - per) * v for v in volumes}
        out[name] = row
    return out


def order_strategies(names: set[str]) -> list[str]:
    return [s for s in BUILTIN_ORDER if s in names] + sorted(names - set(BUILTIN_ORDER))


def aggregate(records: list[TaskRecord], prices_file: str | None = None) -> dict:
    """Everything the report shows (the results.json object)."""
    names = order_strategies({r.strategy for r in records})
    by = {s: [r for r in records if r.strategy == s] for s in names}
    stats = {s: strategy_stats(by[s]) for s in names}
    tasks = sorted({r.task for r in records})
    per_task = {
        t: {
            r.strategy: {
                "outcome": r.outcome,
                "cost_usd": r.cost["total"],
                "consults": r.consults,
                "steps": r.steps,
            }
            for r in records
            if r.task == t
        }
        for t in tasks
    }
    headline = {}
    fr = stats.get("frontier")
    for s in names:
        if s in ("frontier", "executor") or fr is None:
            continue
        a = stats[s]
        ratio = (
            a["usd_per_solved"] / fr["usd_per_solved"]
            if a["usd_per_solved"] is not None and fr["usd_per_solved"]
            else None
        )
        headline[s] = {
            "usd_per_task": a["usd_per_task"],
            "frontier_usd_per_task": fr["usd_per_task"],
            "cost_per_task_ratio": _div(a["usd_per_task"] or 0.0, fr["usd_per_task"] or 0.0),
            "usd_per_solved": a["usd_per_solved"],
            "frontier_usd_per_solved": fr["usd_per_solved"],
            "cost_per_solved_ratio": ratio,
            "success_rate": a["success_rate"],
            "frontier_success_rate": fr["success_rate"],
            "success_delta": (
                a["success_rate"] - fr["success_rate"]
                if a["success_rate"] is not None and fr["success_rate"] is not None
                else None
            ),
        }
    consults = [
        {
            "strategy": r.strategy,
            "task": r.task,
            "step": c.step,
            "trigger": c.trigger,
            "mode": c.mode,
            "cost_usd": c.cost_usd,
            "steps_after": max(0, r.steps - c.step),
            "outcome_after": r.outcome,
            "passed_after": r.passed,
        }
        for r in records
        for c in r.consult_ledger
    ]
    return {
        "prices_file": prices_file,
        "strategies": names,
        "stats": stats,
        "headline": headline,
        "per_task": per_task,
        "consults": consults,
        "break_even": break_even(stats),
        "cost_per_task": {s: [r.cost["total"] for r in by[s]] for s in names},
    }
