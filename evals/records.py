"""Reads an eval's outputs back (result.json + trace.jsonl per task) and prices them, optionally anew.

Costs always come from the traces' `model_call` usage: with no new prices each call keeps its recorded
`cost_usd`; with a prices file, a call whose endpoint (or else model) is named there is re-priced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from advisor.messages import Usage
from advisor.pricing import Price
from advisor.task import TaskError, read_yaml
from advisor.trace import read_trace

TOKEN_KINDS = ("input", "cached_input", "cache_write", "output", "reasoning")
ROLES = ("executor", "frontier")


def load_prices(path: Path) -> dict[str, Price]:
    """prices.yaml: {name: {input, cached_input, output[, cache_write, reasoning]}} (optionally under
    `prices:`); a name is an endpoint name or a model name. USD per million tokens."""
    data = read_yaml(Path(path))
    if isinstance(data, dict) and set(data) == {"prices"}:
        data = data["prices"]
    if not isinstance(data, dict) or not data:
        raise TaskError(
            f"{path}: a prices file maps endpoint or model names to {{input, cached_input, output}}"
        )
    out = {}
    for name, p in data.items():
        try:
            out[str(name)] = Price.model_validate(p)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise TaskError(f"{path}: {name}{'.' + loc if loc else ''}: {err['msg']}") from None
    return out


def _usage(d: dict) -> Usage:
    return Usage(**{k: int(d.get(k, 0)) for k in TOKEN_KINDS})


# consult modes in which the frontier acts in the executor's conversation for some steps
HANDOVER_MODES = ("takeover", "restart")


@dataclass
class Consult:
    step: int
    trigger: str
    mode: str
    cost_usd: float


@dataclass
class TaskRecord:
    strategy: str
    task: str
    outcome: str
    steps: int
    consults: int
    wall_s: float
    tokens: dict  # role -> kind -> count
    cost: dict  # executor, frontier, total, frontier_only_estimate
    model_calls: int = 0
    error: str | None = None
    consult_ledger: list[Consult] = field(default_factory=list)
    consults_by_trigger: dict[str, int] = field(default_factory=dict)  # tool, failures, plan, ...
    # attempts that died with their Ray worker or node: spent, but not in `cost` (result.json's `aborted`)
    aborted_usd: float = 0.0
    aborted_calls: int = 0

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


class Pricer:
    def __init__(self, prices: dict[str, Price] | None = None):
        self.prices = prices or {}

    def find(self, endpoint: str | None, model: str | None) -> Price | None:
        if endpoint in self.prices:
            return self.prices[endpoint]
        return self.prices.get(model) if model else None

    def call_cost(self, ev: dict) -> float:
        p = self.find(ev.get("endpoint"), ev.get("model"))
        return float(ev.get("cost_usd") or 0.0) if p is None else p.cost(_usage(ev.get("usage") or {}))


def read_record(task_dir: Path, strategy: str, pricer: Pricer) -> TaskRecord:
    res = json.loads((task_dir / "result.json").read_text(encoding="utf-8"))
    tokens = {r: {k: int(res.get("tokens", {}).get(r, {}).get(k, 0)) for k in TOKEN_KINDS} for r in ROLES}
    rec = TaskRecord(
        strategy=strategy,
        task=res.get("task", task_dir.name),
        outcome=res.get("outcome", "error"),
        steps=int(res.get("steps", 0)),
        consults=int(res.get("consults", 0)),
        wall_s=float(res.get("wall_s", 0.0)),
        tokens=tokens,
        cost={
            k: float(res.get("cost_usd", {}).get(k, 0.0)) for k in (*ROLES, "total", "frontier_only_estimate")
        },
        model_calls=int(res.get("model_calls", 0)),
        error=res.get("error"),
        aborted_usd=float((res.get("aborted") or {}).get("cost_usd", 0.0)),
        aborted_calls=int((res.get("aborted") or {}).get("model_calls", 0)),
    )
    trace = task_dir / "trace.jsonl"
    if trace.is_file():
        _price_from_trace(rec, read_trace(trace), pricer)
    by_trigger = res.get("consults_by_trigger")
    if not isinstance(by_trigger, dict):  # a result.json from before the field: the trace's consults
        by_trigger = {}
        for c in rec.consult_ledger:
            by_trigger[c.trigger] = by_trigger.get(c.trigger, 0) + 1
    rec.consults_by_trigger = {str(k): int(v) for k, v in by_trigger.items()}
    return rec


def _price_from_trace(rec: TaskRecord, events: list[dict], pricer: Pricer) -> None:
    start = next((e for e in events if e.get("type") == "task_start"), {})
    by_role = dict.fromkeys(ROLES, 0.0)
    usage_all = Usage()
    pending_takeover: Consult | None = None
    last_consult_call = 0.0
    for ev in events:
        kind = ev.get("type")
        if kind == "model_call":
            cost = pricer.call_cost(ev)
            by_role[ev.get("role", "executor")] = by_role.get(ev.get("role", "executor"), 0.0) + cost
            usage_all = usage_all + _usage(ev.get("usage") or {})
            purpose = ev.get("purpose")
            if purpose == "consult":
                last_consult_call = cost
            elif purpose == "takeover" and pending_takeover is not None:
                pending_takeover.cost_usd += cost  # takeover steps are what that consult bought
            else:
                pending_takeover = None
        elif kind == "consult":
            # advise: its model_call was emitted just before it; takeover and restart make no consult call
            # of their own, they buy the frontier steps that follow (purpose "takeover")
            mode = ev.get("mode") or "advise"
            c = Consult(int(ev.get("step", 0)), ev.get("trigger", ""), mode, last_consult_call)
            pending_takeover = c if mode in HANDOVER_MODES else None
            last_consult_call = 0.0
            rec.consult_ledger.append(c)
    rec.cost["executor"], rec.cost["frontier"] = by_role["executor"], by_role["frontier"]
    rec.cost["total"] = sum(by_role.values())
    # frontier-only: every token of the task at the frontier endpoint's price
    fr = start.get("frontier") or (start.get("executor") if start.get("strategy") == "frontier" else None)
    if fr:
        p = pricer.find(fr.get("endpoint"), fr.get("model"))
        if p is None:
            raw = (start.get("prices") or {}).get(fr.get("endpoint"))
            p = Price.model_validate(raw) if raw else None
        rec.cost["frontier_only_estimate"] = p.cost(usage_all) if p is not None else 0.0


def load_records(out: Path, prices: dict[str, Price] | None = None) -> list[TaskRecord]:
    """Every finished task (one with result.json) under out/<strategy>/<task>/."""
    pricer = Pricer(prices)
    records = []
    for sdir in sorted(p for p in Path(out).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for tdir in sorted(p for p in sdir.iterdir() if (p / "result.json").is_file()):
            records.append(read_record(tdir, sdir.name, pricer))
    return records
