"""Writes DIR/report.md, DIR/report.html (one self-contained file, plots inline) and DIR/results.json."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jinja2
from advisor.evals import plots
from advisor.evals.aggregate import VOLUMES, aggregate
from advisor.evals.records import ROLES, load_records

from advisor.pricing import Price, usd
from advisor.report_format import HTML_STYLE, HTML_TABLES, md_table, write_whole


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def secs(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}x"


def _triggers(stats: dict) -> str:
    """Consults per task by trigger (tool: the executor asked; failures, plan, ...: the policy)."""
    n = stats["tasks"] or 1
    return ", ".join(f"{t} {c / n:.2f}" for t, c in stats.get("consults_by_trigger", {}).items()) or "-"


def _tok(t: dict) -> str:
    return f"{t['input']:,} / {t['cached_input']:,} / {t['output'] + t['reasoning']:,}"


def tables(res: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The report's tables as (header, rows) of display strings; markdown and HTML render the same ones."""
    names = res["strategies"]
    st = res["stats"]
    strat = (
        [
            "strategy",
            "tasks",
            "solved",
            "success",
            "total USD",
            "USD/task",
            "USD/solved",
            "executor tok in/cached/out",
            "frontier tok in/cached/out",
            "median latency",
            "p95 latency",
            "consults/task",
            "consults by trigger",
        ],
        [
            [
                s,
                str(st[s]["tasks"]),
                str(st[s]["solved"]),
                pct(st[s]["success_rate"]),
                usd(st[s]["total_usd"]),
                usd(st[s]["usd_per_task"]),
                usd(st[s]["usd_per_solved"]),
                _tok(st[s]["tokens"]["executor"]),
                _tok(st[s]["tokens"]["frontier"]),
                secs(st[s]["latency_s"]["median"]),
                secs(st[s]["latency_s"]["p95"]),
                f"{st[s]['consults_per_task'] or 0:.2f}",
                _triggers(st[s]),
            ]
            for s in names
        ],
    )
    per_task = (
        ["task"] + [f"{s}" for s in names],
        [
            [t] + [f"{row[s]['outcome']} {usd(row[s]['cost_usd'])}" if s in row else "-" for s in names]
            for t, row in res["per_task"].items()
        ],
    )
    be = res["break_even"]
    brk = (
        ["strategy", "USD/task"]
        + [f"{v:,}/month" for v in VOLUMES]
        + [f"saved vs frontier at {v:,}" for v in VOLUMES],
        [
            [s, usd(be[s]["usd_per_task"])]
            + [usd(be[s]["monthly_usd"][str(v)]) for v in VOLUMES]
            + [
                usd(be[s]["monthly_savings_vs_frontier_usd"][str(v)])
                if "monthly_savings_vs_frontier_usd" in be[s]
                else "-"
                for v in VOLUMES
            ]
            for s in names
        ],
    )
    cons = (
        ["strategy", "task", "step", "trigger", "mode", "cost", "steps after", "task outcome"],
        [
            [
                c["strategy"],
                c["task"],
                str(c["step"]),
                c["trigger"],
                c["mode"],
                usd(c["cost_usd"]),
                str(c["steps_after"]),
                c["outcome_after"],
            ]
            for c in res["consults"]
        ],
    )
    return {"strategies": strat, "per_task": per_task, "break_even": brk, "consults": cons}


def headline_lines(res: dict) -> list[str]:
    lines = []
    for s, h in res["headline"].items():
        lines.append(
            f"{s}: {usd(h['usd_per_solved'])} per solved task against {usd(h['frontier_usd_per_solved'])} "
            f"frontier-only ({ratio(h['cost_per_solved_ratio'])}); success {pct(h['success_rate'])} "
            f"against {pct(h['frontier_success_rate'])} frontier-only; {usd(h['usd_per_task'])} per task against "
            f"{usd(h['frontier_usd_per_task'])} ({ratio(h['cost_per_task_ratio'])})."
        )
    if not lines:
        lines.append("No headline: it needs a frontier run and an advisor-style run in the same eval.")
    for s, st in res["stats"].items():
        if st.get("aborted_model_calls"):
            lines.append(
                f"{s}: {usd(st['aborted_usd'])} more was spent on {st['aborted_model_calls']} model calls of "
                "attempts that died with their Ray worker or node (aborted spend, not in the costs above)."
            )
    return lines


TITLES = {
    "strategies": "Per strategy",
    "per_task": "Per task (outcome, USD)",
    "consults": "Escalation ledger",
    "break_even": "Break-even (monthly USD)",
}


def render_md(res: dict) -> str:
    tb = tables(res)
    parts = ["# Eval report", ""]
    if res.get("prices_file"):
        parts += [f"Costs re-priced with `{res['prices_file']}`.", ""]
    parts += ["## Headline", ""] + [f"- {line}" for line in headline_lines(res)] + [""]
    for key in ("strategies", "break_even", "per_task", "consults"):
        parts += [f"## {TITLES[key]}", "", md_table(*tb[key]) if tb[key][1] else "none", ""]
    parts += ["Plots: see report.html. Every number here is in results.json.", ""]
    return "\n".join(parts)


HTML = jinja2.Environment(autoescape=True).from_string(
    """<!doctype html>
<html><head><meta charset="utf-8"><title>Eval report</title>
"""
    + HTML_STYLE
    + """
</head><body><h1>Eval report</h1>
{% if prices_file %}<p>Costs re-priced with <code>{{ prices_file }}</code>.</p>{% endif %}
<h2>Headline</h2><ul>{% for l in headline %}<li>{{ l }}</li>{% endfor %}</ul>
<div class="plots">{% for name, b64 in plots %}<img alt="{{ name }}" src="data:image/png;base64,{{ b64 }}">{% endfor %}</div>
"""
    + HTML_TABLES
    + """</body></html>
"""
)


def render_html(res: dict) -> str:
    tb = tables(res)
    pngs = [
        ("cost against success", plots.cost_vs_success(res)),
        ("cost per task", plots.cost_distribution(res)),
    ]
    return HTML.render(
        prices_file=res.get("prices_file"),
        headline=headline_lines(res),
        plots=[(n, base64.b64encode(b).decode("ascii")) for n, b in pngs],
        tables=[(TITLES[k], tb[k]) for k in ("strategies", "break_even", "per_task", "consults")],
    )


def write_report(out: Path, prices: dict[str, Price] | None = None, prices_file: str | None = None) -> dict:
    """Reads every finished task under `out`, (re-)prices it, writes the three report files; returns results."""
    out = Path(out)
    records = load_records(out, prices)
    res = aggregate(records, prices_file)
    write_whole(out / "results.json", json.dumps(res, indent=2) + "\n")
    write_whole(out / "report.md", render_md(res))
    write_whole(out / "report.html", render_html(res))
    return res


__all__ = ["ROLES", "render_html", "render_md", "write_report"]
