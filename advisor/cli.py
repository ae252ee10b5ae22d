"""The `advisor` command: `advisor run task.yaml ...` (and `eval` / `report` when evals is installed)."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from importlib.metadata import entry_points
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from advisor import interrupt
from advisor.pricing import usd
from advisor.progress import Progress, notes_to
from advisor.result import TaskResult, saved_usd
from advisor.runner import STRATEGIES, Advisor, new_run_id
from advisor.task import Task, TaskError, config_otel, load_task, user_config_dir
from advisor.version import package_version

COMMANDS_GROUP = "advisor.commands"  # entry points: callables that add a subcommand to the parser


def _tokens(u: dict) -> str:
    return f"{u.get('input', 0)}/{u.get('cached_input', 0)}/{u.get('output', 0) + u.get('reasoning', 0)}"


def results_table(results: list[TaskResult]) -> Table:
    t = Table(title="results")
    cols = [
        "task",
        "outcome",
        "steps",
        "consults",
        "exec tok in/cached/out",
        "frontier tok in/cached/out",
        "exec USD",
        "frontier USD",
        "total USD",
        "frontier-only USD",
        "saved",
    ]
    for c in cols:
        t.add_column(c, justify="left" if c in ("task", "outcome") else "right")
    for r in results:
        tok = r.tokens
        c = r.cost_usd
        style = {"passed": "green", "failed": "red", "budget_exceeded": "yellow", "error": "red"}[r.outcome]
        t.add_row(
            r.task,
            f"[{style}]{r.outcome}[/]",
            str(r.steps),
            f"{r.consults}" + (f" (+{r.skipped_consults} skipped)" if r.skipped_consults else ""),
            _tokens(tok.get("executor", {})),
            _tokens(tok.get("frontier", {})),
            usd(c.get("executor", 0.0)),
            usd(c.get("frontier", 0.0)),
            usd(c.get("total", 0.0)),
            usd(c.get("frontier_only_estimate", 0.0)),
            "-" if (saved := saved_usd(r)) is None else usd(saved),
        )
    return t


async def _run(
    tasks: list[Task], args: argparse.Namespace, console: Console, run_id: str
) -> list[TaskResult]:
    live_display = console.is_terminal
    progress = Progress([t.name for t in tasks], console, live=live_display)
    live = (
        Live(console=console, refresh_per_second=8, transient=True, get_renderable=progress.renderable)
        if live_display
        else contextlib.nullcontext()
    )
    names = ", ".join(t.name for t in tasks[:3]) + (f" and {len(tasks) - 3} more" if len(tasks) > 3 else "")
    console.print(
        f"running {len(tasks)} task{'s' if len(tasks) != 1 else ''} ({names}), strategy {args.strategy}, "
        f"outputs in {Path(args.runs_dir) / run_id}",
        markup=False,
        highlight=False,
    )
    with live, notes_to(progress):  # on screen from the first second: loading, compiling, each step
        otel = config_otel([t.base_dir / "advisor.yaml" for t in tasks] + [user_config_dir() / "advisor.yaml"])
        async with Advisor(
            runs_dir=args.runs_dir,
            run_id=run_id,
            listeners=[progress],
            otel=otel,
            max_usd=args.max_usd,
            **ray_settings(args),
        ) as adv:
            results = await adv.run_many(tasks, strategy=args.strategy, concurrency=args.concurrency)
    console.print(results_table(results))
    for r in results:  # why a task errored or stopped belongs on screen, not only in result.json
        if r.error:
            console.print(f"{r.task}: {r.outcome}: {r.error}", markup=False, highlight=False)
    console.print(f"outputs: {adv.run_dir}")
    return results


def ray_settings(args: argparse.Namespace) -> dict:
    """Advisor's backend keywords for `--ray [ADDRESS]` (absent: the local backend)."""
    if args.ray is None:
        return {}
    return {
        "backend": "ray",
        "ray_address": None if args.ray == LOCAL_RAY else args.ray,
        "ray_options": {
            "max_attempts": args.ray_attempts,
            "num_cpus": args.ray_cpus,
            **({"num_gpus": args.ray_gpus} if args.ray_gpus else {}),
        },
    }


LOCAL_RAY = "local"


def add_cluster_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """`--ray [ADDRESS]`, `--ray-cpus`, `--ray-attempts` and `--max-usd`, for `run` and `eval`."""
    p.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL_RAY,
        default=None,
        metavar="ADDRESS",
        help="run each task on a Ray cluster: auto, HOST:PORT, ray://HOST:PORT; no ADDRESS: a local Ray "
        "for this run (pip install 'advisor[ray]'; docs/scale.md)",
    )
    p.add_argument(
        "--ray-cpus", type=float, default=1.0, help="with --ray: CPUs Ray reserves per task (default: 1)"
    )
    p.add_argument(
        "--ray-gpus",
        type=float,
        default=0.0,
        help="with --ray: GPUs per task, so Ray places tasks on GPU nodes (embedded endpoints; default: 0)",
    )
    p.add_argument(
        "--ray-attempts",
        type=int,
        default=3,
        help="with --ray: attempts per task when workers or nodes die under it (default: 3)",
    )
    p.add_argument(
        "--max-usd",
        type=float,
        default=None,
        help=f"the whole {what}'s budget: no model call starts once this much is spent (on Ray: cluster-wide)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    console = Console(width=None if sys.stdout.isatty() else 180)
    err = Console(stderr=True)
    try:
        tasks = [load_task(p, strategies=(args.strategy,)) for p in args.tasks]
    except TaskError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return 2
    run_id = new_run_id()
    try:
        results = interrupt.run(_run(tasks, args, console, run_id))
    except TaskError as e:  # raised before any task starts (e.g. an endpoint that cannot be made)
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except interrupt.Interrupted:
        run_dir = Path(args.runs_dir) / run_id
        done = len(list(run_dir.glob("*/result.json")))
        err.print(
            f"interrupted: {done} of {len(tasks)} tasks finished, outputs in {run_dir}; "
            f"run the rest again with: {interrupt.rerun_command()}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        interrupt.leave()
    return 0 if all(r.passed for r in results) else 1


def cmd_init(args: argparse.Namespace) -> int:
    from advisor import scaffold

    try:
        written = scaffold.write(args.dir, args.preset, force=args.force)
    except FileExistsError as e:
        Console(stderr=True).print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return 2
    console = Console()
    console.print(f"wrote {', '.join(str(p) for p in written)} (preset {args.preset})", markup=False)
    keys = sorted(set(re.findall(r"api_key_env: (\w+)", written[1].read_text())))
    if keys:
        console.print(f"export {', '.join(keys)}, then:", markup=False, highlight=False)
    console.print(f"  advisor check {written[1]}\n  advisor run {written[0]}", markup=False, highlight=False)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from advisor.endpoint_check import check_all, load_endpoints

    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        endpoints = load_endpoints(args.file)
        reports = interrupt.run(check_all(endpoints))
    except TaskError as e:
        Console(stderr=True).print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except interrupt.Interrupted:
        Console(stderr=True).print("interrupted: no endpoint checked to the end", markup=False)
        return interrupt.EXIT_CODE
    for r in reports:
        console.print(r.line(), markup=False, highlight=False, soft_wrap=True)
    return 0 if all(r.ok for r in reports) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="advisor", description="Advisor-Mode agent loops with a cost ledger."
    )
    parser.add_argument("--version", action="version", version=f"advisor {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run task.yaml files (concurrently) and report cost per task")
    run.add_argument("tasks", nargs="+", type=Path, help="task.yaml files")
    run.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="where runs/<run-id>/<task>/ go (default: runs)"
    )
    run.add_argument("--concurrency", type=int, default=40, help="tasks run at once (default: 40)")
    run.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="advisor",
        help="advisor: the task's escalation policy; executor: no consults; frontier: frontier alone",
    )
    add_cluster_arguments(run, "run")
    run.set_defaults(func=cmd_run)
    from advisor.mcp_server import add_mcp_parser
    from advisor.proxy.cli import add_proxy_parser

    add_proxy_parser(sub)
    add_mcp_parser(sub)
    _add_serve_parser(sub)
    from advisor.scaffold import PRESETS

    init = sub.add_parser("init", help="write a commented task.yaml and the endpoints for a provider preset")
    init.add_argument("dir", type=Path, nargs="?", default=Path("."), help="folder to write into (default: .)")
    init.add_argument(
        "--preset", choices=list(PRESETS), default="embedded", help="providers (default: embedded, offline)"
    )
    init.add_argument("--force", action="store_true", help="overwrite task.yaml / advisor.yaml if present")
    init.set_defaults(func=cmd_init)
    check = sub.add_parser(
        "check", help="try each endpoint of an advisor.yaml or task.yaml: key, server, model, one token, price"
    )
    check.add_argument("file", type=Path, help="an advisor.yaml (endpoints) or a task.yaml")
    check.set_defaults(func=cmd_check)
    endpoints = sub.add_parser("endpoints", help="endpoint commands: check (the same as `advisor check`)")
    endpoints_sub = endpoints.add_subparsers(dest="endpoints_command", required=True)
    again = endpoints_sub.add_parser("check", help="the same as `advisor check`")
    again.add_argument("file", type=Path, help="an advisor.yaml (endpoints) or a task.yaml")
    again.set_defaults(func=cmd_check)
    from advisor.engine.plan import (
        add_engine_parser,  # `advisor engine plan`: torch is imported only when it runs
    )

    add_engine_parser(sub)
    # packages above advisor (evals: `eval`, `report`) plug their subcommands in through this entry-point
    # group, so advisor never imports them
    for command in sorted(entry_points(group=COMMANDS_GROUP), key=lambda c: c.name):
        command.load()(sub)
    return parser


def _add_serve_parser(sub) -> None:
    """`advisor serve MODEL`: the OpenAI-compatible server (advisor.engine.serving.server; torch loads on use)."""

    def cmd_serve(args: argparse.Namespace) -> int:
        from advisor.engine.serving.server import serve

        return serve(args)

    serve_p = sub.add_parser("serve", help="serve a Step checkpoint over an OpenAI-compatible HTTP API")
    from advisor.engine.serving.args import add_serve_arguments

    add_serve_arguments(serve_p)
    serve_p.set_defaults(func=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside a run (loading tasks, writing a report): nothing to resume
        Console(stderr=True).print("interrupted", markup=False, highlight=False)
        return interrupt.EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
