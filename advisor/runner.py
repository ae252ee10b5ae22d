"""`Advisor`: runs tasks (one or many, concurrently) with shared endpoints, writing each task's outputs."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from rich.console import Console

from advisor.endpoints import Endpoint, EndpointConfig, EndpointError, make_endpoint
from advisor.loop import Slot, TaskLoop
from advisor.otel import OtelConfig
from advisor.otel import resolve as otel_settings
from advisor.pricing import FREE, Price
from advisor.progress import Progress
from advisor.result import TaskResult
from advisor.task import Task, TaskError
from advisor.tools.mcp_client import McpPool

# advisor: the escalation policy's triggers (and the advisor tool when task.yaml offers it); advisor-tool:
# the executor consults through its advisor tool only; combined: both; executor, frontier: one model alone
STRATEGIES = ("advisor", "executor", "frontier", "advisor-tool", "combined")


def new_run_id() -> str:
    # time-ordered, and unique even for runs started in the same second
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class Advisor:
    """Runs Advisor-Mode tasks.

    >>> async with Advisor(runs_dir="runs") as adv:
    ...     result = await adv.run(Task.from_yaml("task.yaml"))

    Endpoints are created once per (name, config) and shared by all concurrent tasks; those this
    object made are closed by `aclose()` (or leaving `async with`); those passed in `endpoints`
    (by name) belong to the caller. With a rich `console`, a line is printed per finished task.
    `otel` (an `OtelConfig`, its dict, or True; default: `ADVISOR_OTEL`) exports each task as an
    OpenTelemetry trace (`advisor.otel`).
    `endpoint_options` go to `make_endpoint` (e.g. a test transport or backoff). Listeners get
    (task output name, trace event) for every event, as it happens.
    """

    def __init__(
        self,
        runs_dir: str | Path = "runs",
        *,
        run_id: str | None = None,
        listeners: list[Callable[[str, dict], None]] | None = None,
        fsync: bool = True,
        endpoints: dict[str, Endpoint] | None = None,
        endpoint_options: dict | None = None,
        console: Console | None = None,
        otel: OtelConfig | dict | bool | None = None,
    ):
        self.runs_dir = Path(runs_dir)
        self.run_id = run_id or new_run_id()
        self.listeners = list(listeners or [])
        if console is not None:  # one line per finished task: outcome, steps, consults, cost
            self.listeners.append(Progress([], console, every_event=False))
        self.fsync = fsync
        self._given = dict(endpoints or {})
        self._endpoints: dict[str, Endpoint] = {}
        self._options = endpoint_options or {}
        self.mcp = McpPool()  # MCP servers start once per Advisor and are shared by its tasks
        self._otel = otel_settings(otel)
        self._exporter = None  # made at the first task: nothing of OpenTelemetry is imported when off

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run_id

    def endpoint(self, name: str, config: EndpointConfig) -> Endpoint:
        if name in self._given:
            return self._given[name]
        key = name + "\x00" + json.dumps(config.model_dump(mode="json"), sort_keys=True)
        if key not in self._endpoints:
            self._endpoints[key] = make_endpoint(name, config, **self._options)
        return self._endpoints[key]

    def _slot(self, task: Task, which: str, role: str) -> Slot | None:
        rc = task.executor if which == "executor" else task.frontier
        if rc is None:
            return None
        cfg = task.endpoints[rc.endpoint]
        price: Price = cfg.price if cfg.price is not None else FREE
        try:
            endpoint = self.endpoint(rc.endpoint, cfg)
        except EndpointError as e:  # e.g. a provider that is not available here: bad input
            raise TaskError(f"{task.source}: endpoints.{rc.endpoint}.provider: {e}") from None
        return Slot(role, endpoint, price, rc.effort)

    def prepare(self, task: Task, strategy: str = "advisor") -> tuple[Slot, Slot | None]:
        """Validates `task` for `strategy` and creates its endpoints; `TaskError` on bad input."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy '{strategy}' (known: {', '.join(STRATEGIES)})")
        task.validate_ready(strategies=(strategy,), given=self._given.keys())
        frontier = self._slot(task, "frontier", "frontier")
        executor = frontier if strategy == "frontier" else self._slot(task, "executor", "executor")
        assert executor is not None
        return executor, frontier

    async def run(
        self, task: Task, strategy: str = "advisor", out_dir: str | Path | None = None
    ) -> TaskResult:
        executor, frontier = self.prepare(task, strategy)
        out = Path(out_dir) if out_dir else self.run_dir / task.name
        listeners = [partial(f, out.name) for f in self.listeners]
        if self._otel is not None:
            if self._exporter is None:
                from advisor.otel import Exporter

                self._exporter = Exporter(self._otel)
            listeners.append(self._exporter.listener(task.goal))
        loop = TaskLoop(
            task,
            executor,
            None if strategy == "frontier" else frontier,
            strategy,
            out,
            listeners=listeners,
            fsync=self.fsync,
            mcp=self.mcp,
            run_id=self.run_id,
        )
        if strategy == "frontier" and frontier is not None:
            loop.ledger.frontier_price = frontier.price
        return await loop.run()

    async def run_many(
        self, tasks: Iterable[Task], *, strategy: str = "advisor", concurrency: int = 40
    ) -> list[TaskResult]:
        tasks = list(tasks)
        for task in tasks:  # bad input stops the batch before any task starts
            self.prepare(task, strategy)
        names = [t.name for t in tasks]
        dupes = {n for n in names if names.count(n) > 1}
        sem = asyncio.Semaphore(max(1, concurrency))

        async def one(i: int, task: Task) -> TaskResult:
            out = self.run_dir / (f"{task.name}-{i}" if task.name in dupes else task.name)
            async with sem:
                return await self.run(task, strategy, out)

        return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(tasks))))

    async def aclose(self) -> None:
        await self.mcp.aclose()
        for ep in self._endpoints.values():
            await ep.aclose()
        self._endpoints.clear()
        if self._exporter is not None:  # sends the queued spans: a blocking HTTP call
            await asyncio.to_thread(self._exporter.shutdown)
            self._exporter = None

    async def __aenter__(self) -> Advisor:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
