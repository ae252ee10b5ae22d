"""`advisor eval SUITE ...` and `advisor report DIR ...` (registered by advisor/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from advisor.evals.harness import plan_jobs, run_suite
from advisor.evals.records import load_prices
from advisor.evals.report import headline_lines, tables, write_report
from advisor.evals.suite import load_suite
from rich.console import Console
from rich.table import Table

from advisor import interrupt
from advisor.cli import add_cluster_arguments, ray_settings
from advisor.progress import Progress, notes_to
from advisor.task import TaskError, config_otel, user_config_dir


def _err(msg: str) -> int:
    Console(stderr=True).print(f"error: {msg}", markup=False, highlight=False, soft_wrap=True)
    return 2


TERMINAL_COLUMNS = (
    "strategy",
    "tasks",
    "solved",
    "success",
    "USD/task",
    "USD/solved",
    "consults/task",
    "consults by trigger",
)


def strategy_table(res: dict) -> Table:
    """The report's per-strategy table, the columns that fit a terminal (all of them: report.md)."""
    header, rows = tables(res)["strategies"]
    keep = [header.index(c) for c in TERMINAL_COLUMNS]
    t = Table(title="per strategy")
    for i in keep:
        t.add_column(header[i], justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*(row[i] for i in keep))
    return t


def _base(suite) -> Path:
    src = Path(suite.source)
    return src if src.is_dir() else src.parent


def cmd_eval(args: argparse.Namespace) -> int:
    console = Console(width=None if sys.stdout.isatty() else 160)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        suite = load_suite(args.suite, endpoints_file=args.endpoints)
        for s in strategies:
            suite.strategy(s)
        if suite.found:
            console.print(f"{suite.source}: {suite.found}", markup=False, highlight=False)
        shown = console if not args.quiet else None
        note = Progress([], shown)
        with notes_to(note):  # model loads, the engine's first compile: lines above the bar
            run = interrupt.run(
                run_suite(
                    suite,
                    strategies,
                    args.out,
                    concurrency=args.concurrency,
                    timeout_s=args.timeout,
                    console=shown,
                    max_usd=args.max_usd,
                    **ray_settings(args),
                    otel=config_otel(
                        [p for p in (args.endpoints,) if p]
                        + [_base(suite) / "advisor.yaml", user_config_dir() / "advisor.yaml"]
                    ),
                )
            )
        res = write_report(args.out)
    except TaskError as e:
        return _err(str(e))
    except interrupt.Interrupted:
        _, done = plan_jobs(suite, strategies, args.out)
        total = len(suite.tasks) * len(strategies)
        Console(stderr=True).print(
            f"interrupted: {len(done)} of {total} task runs finished, kept in {args.out}; "
            f"resume with: {interrupt.rerun_command()}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        interrupt.leave()
    console.print(f"ran {len(run.ran)} task runs, skipped {len(run.skipped)} already finished")
    console.print(strategy_table(res))
    for line in headline_lines(res):
        console.print(line, markup=False, highlight=False)
    console.print(
        f"report: {args.out / 'report.md'}, {args.out / 'report.html'}, {args.out / 'results.json'}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        return _err(f"{args.dir}: eval output folder not found")
    try:
        prices = load_prices(args.prices) if args.prices else None
        res = write_report(args.dir, prices, str(args.prices) if args.prices else None)
    except TaskError as e:
        return _err(str(e))
    console = Console()
    for line in headline_lines(res):
        console.print(line, markup=False, highlight=False)
    console.print(
        f"report: {args.dir / 'report.md'}, {args.dir / 'report.html'}, {args.dir / 'results.json'}"
    )
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="run a suite under several strategies (resumable) and write the report")
    p.add_argument(
        "suite",
        type=Path,
        help="a folder of task files (*.yaml in it, */task.yaml below), a suite.yaml, or a .jsonl of {prompt, answer}",
    )
    p.add_argument(
        "--strategies",
        default="executor,frontier,advisor",
        help="comma-separated: executor, frontier, advisor (policy), advisor-tool (the executor asks), combined, or a suite's own (default: executor,frontier,advisor)",
    )
    p.add_argument("--concurrency", type=int, default=40, help="task runs at once (default: 40)")
    p.add_argument(
        "--out", type=Path, required=True, help="output folder; rerunning with the same one resumes"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="per-task seconds (default: suite timeout_s or budget.max_wall_s + 30)",
    )
    p.add_argument(
        "--endpoints", type=Path, default=None, help="an advisor.yaml whose endpoints every task gets"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_cluster_arguments(p, "eval")
    p.set_defaults(func=cmd_eval)


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="rewrite an eval's report from its traces, optionally with new prices")
    p.add_argument("dir", type=Path, help="the eval's --out folder")
    p.add_argument(
        "--prices",
        type=Path,
        default=None,
        help="prices.yaml: {endpoint or model name: {input, cached_input, output}}",
    )
    p.set_defaults(func=cmd_report)
