"""Runs a suite under several strategies with a bounded pool; resumable through result.json.

Layout: OUT/<strategy>/<task>/{trace.jsonl,result.json,report.md}. result.json is written atomically
last, so its presence means the task is paid for and done: a rerun with the same OUT skips it. A task
folder without result.json (the run was killed mid-task) is moved to OUT/.aborted/ and the task redone.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from advisor.evals.suite import Suite
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from advisor.aborted import set_aside, spend
from advisor.pricing import usd
from advisor.result import TaskResult
from advisor.runner import Advisor
from advisor.task import Task
from advisor.trace import read_trace

RunFn = Callable[[Task, str, Path], Awaitable[TaskResult]]


@dataclass
class Job:
    strategy: str
    base: str
    task: Task
    out: Path


@dataclass
class EvalRun:
    ran: list[TaskResult] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def plan_jobs(suite: Suite, strategies: list[str], out: Path) -> tuple[list[Job], list[Path]]:
    jobs, done = [], []
    for s in strategies:
        spec = suite.strategy(s)
        for t in suite.tasks:
            d = out / s / t.name
            if (d / "result.json").is_file():
                done.append(d)
            else:
                jobs.append(Job(s, spec.base, suite.task_for(t, s), d))
    return jobs, done


def error_result(job: Job, error: str) -> TaskResult:
    """An error outcome that still carries what the trace says was spent (billed calls count)."""
    trace = job.out / "trace.jsonl"
    paid = spend(read_trace(trace) if trace.is_file() else [])
    cost = {**paid.cost_usd, "frontier_only_estimate": 0.0}
    r = TaskResult(
        job.task.name,
        job.strategy,
        "error",
        error=error,
        model_calls=paid.model_calls,
        tokens=paid.tokens,
        cost_usd=cost,
    )
    if trace.is_file():  # the cancelled loop wrote no task_end: close the trace the way the format says
        events = read_trace(trace)
        if not any(e.get("type") == "task_end" for e in events):
            end = {
                "seq": len(events),
                "t": time.time(),
                "type": "task_end",
                "outcome": "error",
                "error": error,
                "result": r.to_dict(),
            }
            with open(trace, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(end) + "\n")
    return r


def _timeout(job: Job, suite: Suite, override: float | None) -> float:
    if override:
        return override
    if suite.timeout_s:
        return suite.timeout_s
    return job.task.budget.max_wall_s + 30.0  # the loop stops itself at max_wall_s; this is the backstop


async def run_suite(
    suite: Suite,
    strategies: list[str],
    out: Path,
    *,
    concurrency: int = 40,
    timeout_s: float | None = None,
    console: Console | None = None,
    run_fn: RunFn | None = None,
    advisor: Advisor | None = None,
    otel: dict | bool | None = None,
    max_usd: float | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    ray_options: dict | None = None,
) -> EvalRun:
    """Runs what is missing under `out`. `run_fn(task, base_strategy, out_dir)` defaults to `Advisor.run`;
    `otel`, `max_usd` (the whole eval's budget), `backend`, `ray_address`, `ray_options`: that Advisor's
    settings (docs/scale.md)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for s in strategies:  # unknown names are bad input before anything runs
        suite.strategy(s)
    jobs, done = plan_jobs(suite, strategies, out)
    meta = {"suite": suite.source, "strategies": strategies, "tasks": [t.name for t in suite.tasks]}
    (out / "eval.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    result = EvalRun(skipped=done)
    own = advisor is None and run_fn is None
    adv = advisor or Advisor(
        runs_dir=out,
        otel=otel,
        max_usd=max_usd,
        backend=backend,  # type: ignore[arg-type]
        ray_address=ray_address,
        ray_options=ray_options,
    )
    run = run_fn or (lambda task, base, d: adv.run(task, base, d))
    try:
        for j in jobs:  # validation before any task starts: bad input pays for nothing
            if run_fn is None:
                adv.prepare(j.task, j.base)
        if run_fn is None and jobs:
            await adv.start()  # an unreachable cluster is bad input too
    except BaseException:
        if own:
            await adv.aclose()
        raise
    sem = asyncio.Semaphore(max(1, concurrency))
    spent = {"usd": 0.0, "passed": 0, "other": 0}
    progress = (
        Progress(
            TextColumn("[bold]eval[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        if console is not None
        else None
    )
    bar = progress.add_task("", total=len(jobs)) if progress else None

    async def one(job: Job) -> TaskResult:
        async with sem:
            set_aside(job.out)
            job.out.mkdir(parents=True)
            try:
                r = await asyncio.wait_for(run(job.task, job.base, job.out), _timeout(job, suite, timeout_s))
            except TimeoutError:
                r = error_result(job, f"timed out after {_timeout(job, suite, timeout_s):.0f} s")
            except Exception as e:  # one task's failure is recorded; the run goes on
                r = error_result(job, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if r.strategy != job.strategy or not (job.out / "result.json").is_file():
                r.strategy = job.strategy
                r.write(job.out)
            spent["usd"] += float(r.cost_usd.get("total", 0.0))
            spent["passed" if r.passed else "other"] += 1
            if progress is not None:
                progress.update(
                    bar,
                    advance=1,
                    description=f"passed {spent['passed']}, not passed {spent['other']}, {usd(spent['usd'])}",
                )
            return r

    try:
        if progress is not None:
            progress.start()
        result.ran = list(await asyncio.gather(*(one(j) for j in jobs)))
    finally:
        if progress is not None:
            progress.stop()
        if own:
            await adv.aclose()
    return result
