"""The proxy's ledger as report.md / report.html / results.json (the `advisor eval` report's style), and
the same page served live at the proxy's `/`.

Per session: requests, model calls and tokens by role, USD by role, consults and what triggered each,
and what the same tokens would have cost on the frontier alone.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jinja2

from advisor.ledger import ROLES
from advisor.pricing import usd
from advisor.proxy.sessions import SessionStore
from advisor.proxy.store import Store
from advisor.report_format import HTML_STYLE, HTML_TABLES, md_table, write_whole


def _tok(t: dict) -> str:
    return f"{t['input']:,} / {t['cached_input']:,} / {t['output'] + t['reasoning']:,}"


def results(store: SessionStore) -> dict:
    """Every number the report shows, per session and in total."""
    sessions = []
    for s in sorted(store.sessions.values(), key=lambda x: x.created):
        calls = Counter(c.role for c in s.ledger.calls)
        sessions.append(
            {
                "session": s.id,
                "requests": s.requests,
                "calls": {r: calls.get(r, 0) for r in ROLES},
                "tokens": s.ledger.tokens_dict(),
                "cost_usd": s.ledger.cost_dict(),
                "consults": [c.__dict__ for c in s.consults],
                "failure_streak": s.policy.consecutive,
                "created": s.created,
                "last_seen": s.last_seen,
            }
        )
    total = {
        "sessions": len(sessions),
        "requests": sum(x["requests"] for x in sessions),
        "calls": {r: sum(x["calls"][r] for x in sessions) for r in ROLES},
        "tokens": {
            r: {
                k: sum(x["tokens"][r][k] for x in sessions)
                for k in ("input", "cached_input", "cache_write", "output", "reasoning")
            }
            for r in ROLES
        },
        "cost_usd": {
            k: round(sum(x["cost_usd"][k] for x in sessions), 10)
            for k in ("executor", "frontier", "total", "frontier_only_estimate")
        },
        "consults": sum(1 for x in sessions for c in x["consults"] if c["kind"] != "skipped"),
        "skipped_consults": sum(1 for x in sessions for c in x["consults"] if c["kind"] == "skipped"),
        "spent_by_day": dict(sorted(store.day_usd.items())),
    }
    return {"total": total, "sessions": sessions}


async def spend(store: Store) -> dict:
    """Booked spend from the database (`advisor.proxy.store`): per key, per session (with its key) and
    per model; calls a stopped proxy left in flight count at their estimate, in estimated_usd."""
    return {
        "by_key": await store.spend_by("key_name"),
        "by_session": await store.spend_by("key_name", "session"),
        "by_model": await store.spend_by("model"),
    }


def _spend_rows(rows: list[dict], cols: list[str]) -> list[list[str]]:
    return [
        [str(r[c]) if r[c] is not None else "(none)" for c in cols]
        + [str(r["calls"]), usd(r["usd"]), usd(r["estimated_usd"]), str(r["in_flight"])]
        for r in rows
    ]


def _triggers(consults: list[dict]) -> str:
    made = Counter(c["trigger"] for c in consults if c["kind"] != "skipped")
    skipped = sum(1 for c in consults if c["kind"] == "skipped")
    text = ", ".join(f"{t} {n}" for t, n in sorted(made.items())) or "none"
    return text + (f" (+{skipped} skipped)" if skipped else "")


def tables(res: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    header = [
        "session",
        "requests",
        "calls exec / frontier",
        "executor tok in/cached/out",
        "frontier tok in/cached/out",
        "executor USD",
        "frontier USD",
        "total USD",
        "frontier-only USD",
        "saved",
        "consults (trigger)",
    ]

    def row(name: str, x: dict, consults: str) -> list[str]:
        c = x["cost_usd"]
        return [
            name,
            str(x["requests"]),
            f"{x['calls']['executor']} / {x['calls']['frontier']}",
            _tok(x["tokens"]["executor"]),
            _tok(x["tokens"]["frontier"]),
            usd(c["executor"]),
            usd(c["frontier"]),
            usd(c["total"]),
            usd(c["frontier_only_estimate"]),
            usd(c["frontier_only_estimate"] - c["total"]),
            consults,
        ]

    rows = [row(x["session"], x, _triggers(x["consults"])) for x in res["sessions"]]
    t = res["total"]
    if rows:
        rows.append(
            row(f"all {t['sessions']} sessions", t, f"{t['consults']} (+{t['skipped_consults']} skipped)")
        )
    consults = [
        [
            x["session"],
            str(c["request"]),
            c["trigger"],
            c["kind"],
            c.get("skip_reason") or "",
            usd(c.get("cost_usd") or 0.0),
        ]
        for x in res["sessions"]
        for c in x["consults"]
    ]
    days = [[d, usd(v)] for d, v in res["total"]["spent_by_day"].items()]
    out = {
        "sessions": (header, rows),
        "consults": (["session", "request", "trigger", "outcome", "skip reason", "USD"], consults),
        "days": (["day (UTC)", "USD"], days),
    }
    sp = res.get("spend")
    if sp is not None:
        tail = ["calls", "USD", "of which estimated", "in flight"]
        out["by_key"] = (["key", *tail], _spend_rows(sp["by_key"], ["key_name"]))
        out["by_key_session"] = (
            ["key", "session", *tail],
            _spend_rows(sp["by_session"], ["key_name", "session"]),
        )
        out["by_model"] = (["model", *tail], _spend_rows(sp["by_model"], ["model"]))
    return out


TITLES = {
    "sessions": "Per session",
    "consults": "Escalation ledger",
    "days": "Spend per day",
    "by_key": "Spend per key",
    "by_key_session": "Spend per key and session",
    "by_model": "Spend per model",
}
SPEND_TABLES = ("by_key", "by_key_session", "by_model")


def headline(res: dict) -> str:
    c = res["total"]["cost_usd"]
    saved = c["frontier_only_estimate"] - c["total"]
    return (
        f"{res['total']['sessions']} sessions, {res['total']['requests']} requests: {usd(c['total'])} "
        f"({usd(c['executor'])} executor, {usd(c['frontier'])} frontier) against {usd(c['frontier_only_estimate'])} "
        f"for the same tokens on the frontier alone; saved {usd(saved)}."
    )


def render_md(res: dict) -> str:
    tb = tables(res)
    parts = ["# Proxy report", "", headline(res), ""]
    for key in ("sessions", "consults", "days", *(k for k in SPEND_TABLES if k in tb)):
        parts += [f"## {TITLES[key]}", "", md_table(*tb[key]) if tb[key][1] else "none", ""]
    parts += ["Every number here is in results.json.", ""]
    return "\n".join(parts)


HTML = jinja2.Environment(autoescape=True).from_string(
    """<!doctype html>
<html><head><meta charset="utf-8"><title>Proxy report</title>
"""
    + HTML_STYLE
    + """
</head><body><h1>Proxy report</h1>
<p>{{ headline }}</p>
"""
    + HTML_TABLES
    + """</body></html>
"""
)


def render_html(res: dict) -> str:
    tb = tables(res)
    return HTML.render(
        headline=headline(res),
        tables=[(TITLES[k], tb[k]) for k in ("sessions", "consults", "days", *SPEND_TABLES) if k in tb],
    )


def write_report(store: SessionStore, out: Path, spent: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    res = results(store)
    if spent is not None:
        res["spend"] = spent
    write_whole(out / "results.json", json.dumps(res, indent=2) + "\n")
    write_whole(out / "report.md", render_md(res))
    write_whole(out / "report.html", render_html(res))
    return res
