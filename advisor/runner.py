"""`Advisor`: runs tasks (one or many, concurrently) with shared endpoints, writing each task's outputs."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rich.console import Console

from advisor.consult import Slot
from advisor.endpoints import Endpoint, EndpointConfig
from advisor.limits import LocalGate
from advisor.loops import Loops
from advisor.otel import OtelConfig
from advisor.otel import resolve as otel_settings
from advisor.progress import Progress
from advisor.result import TaskResult
from advisor.task import Task

if TYPE_CHECKING:
    from advisor.cluster import RayBackend

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

    `max_usd` caps the whole run's spend (no model call starts once it is booked); an endpoint's
    `max_concurrency` caps its calls in flight across all the run's tasks. `backend="ray"` runs each
    task as a Ray task on the cluster at `ray_address` (Ray's forms: "auto", "HOST:PORT",
    "ray://HOST:PORT"; None: a local Ray for this process), with the same outputs here
    (advisor.cluster, docs/scale.md); `ray_options`: `max_attempts` (a task whose worker or node died is
    run again, at most this many attempts in all; default 3) and Ray task options (`num_cpus`, default 1;
    `num_gpus`, `resources`, `scheduling_strategy`, default "SPREAD", `runtime_env`, ...).
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
        max_usd: float | None = None,
        backend: Literal["local", "ray"] = "local",
        ray_address: str | None = None,
        ray_options: dict | None = None,
    ):
        self.runs_dir = Path(runs_dir)
        self.run_id = run_id or new_run_id()
        self.listeners = list(listeners or [])
        if console is not None:  # one line per finished task: outcome, steps, consults, cost
            self.listeners.append(Progress([], console, every_event=False))
        self.fsync = fsync
        if backend == "ray" and endpoints:
            raise ValueError("endpoints= objects cannot travel to Ray workers: give them as endpoint configs")
        self.max_usd = max_usd
        # endpoints, MCP servers (started once per Advisor) and the run's limits, shared by its tasks
        self.loops = Loops(
            fsync=fsync, given=endpoints, endpoint_options=endpoint_options, gate=LocalGate(max_usd)
        )
        self._otel = otel_settings(otel)
        self._exporter = None  # made at the first task: nothing of OpenTelemetry is imported when off
        if backend not in ("local", "ray"):
            raise ValueError(f"unknown backend '{backend}' (known: local, ray)")
        self.backend = backend
        self.ray_address = ray_address
        self.ray_options = dict(ray_options or {})
        self._cluster: RayBackend | None = None  # connected at start() (or the first task)
        self._starting = asyncio.Lock()

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run_id

    @property
    def mcp(self):
        return self.loops.mcp

    @property
    def gate(self) -> LocalGate:
        """The run's limits for the tasks run in this process (peaks and spend, for a look afterwards)."""
        return self.loops.gate  # type: ignore[return-value]

    def endpoint(self, name: str, config: EndpointConfig) -> Endpoint:
        return self.loops.endpoint(name, config)

    def validate(self, task: Task, strategy: str = "advisor") -> None:
        """Checks `task` for `strategy` (files, endpoints, prices, keys); `TaskError` on bad input."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy '{strategy}' (known: {', '.join(STRATEGIES)})")
        task.validate_ready(strategies=(strategy,), given=self.loops.given.keys())

    def prepare(self, task: Task, strategy: str = "advisor") -> None:
        """Validates `task` for `strategy` and creates its endpoints; `TaskError` on bad input. On the Ray
        backend only validates: the endpoints are made in the workers, where the task runs."""
        self.validate(task, strategy)
        if self.backend == "local":
            self.slots(task, strategy)

    def slots(self, task: Task, strategy: str) -> tuple[Slot, Slot | None]:
        """The executor and frontier slots of `task` under `strategy`, on this Advisor's endpoints."""
        return self.loops.slots(task, strategy)

    async def start(self) -> None:
        """Connects to the Ray cluster (backend "ray"; a no-op otherwise). Called by the first task; call
        it first to learn of an unreachable cluster (`advisor.cluster.ClusterError`, a `TaskError`) before
        anything runs."""
        if self.backend != "ray":
            return
        async with self._starting:  # the first tasks of a batch all wait for one connection
            if self._cluster is None:
                from advisor.cluster import RayBackend

                self._cluster = await RayBackend.connect(
                    self.ray_address, max_usd=self.max_usd, fsync=self.fsync, **self.ray_options
                )

    async def run(
        self, task: Task, strategy: str = "advisor", out_dir: str | Path | None = None
    ) -> TaskResult:
        self.prepare(task, strategy)
        out = Path(out_dir) if out_dir else self.run_dir / task.name
        listeners = [partial(f, out.name) for f in self.listeners]
        if self._otel is not None:
            if self._exporter is None:
                from advisor.otel import Exporter

                self._exporter = Exporter(self._otel)
            listeners.append(self._exporter.listener(task.goal))
        if self.backend == "ray":
            await self.start()
            assert self._cluster is not None
            return await self._cluster.run(task, strategy, out, listeners, run_id=self.run_id)
        return await self.loops.loop_for(task, strategy, out, listeners=listeners, run_id=self.run_id).run()

    async def run_many(
        self, tasks: Iterable[Task], *, strategy: str = "advisor", concurrency: int = 40
    ) -> list[TaskResult]:
        tasks = list(tasks)
        for task in tasks:  # bad input stops the batch before any task starts
            self.prepare(task, strategy)
        await self.start()  # an unreachable cluster, too
        names = [t.name for t in tasks]
        dupes = {n for n in names if names.count(n) > 1}
        sem = asyncio.Semaphore(max(1, concurrency))

        async def one(i: int, task: Task) -> TaskResult:
            out = self.run_dir / (f"{task.name}-{i}" if task.name in dupes else task.name)
            async with sem:
                return await self.run(task, strategy, out)

        return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(tasks))))

    async def aclose(self) -> None:
        if self._cluster is not None:
            await self._cluster.aclose()
            self._cluster = None
        await self.loops.aclose()
        if self._exporter is not None:  # sends the queued spans: a blocking HTTP call
            await asyncio.to_thread(self._exporter.shutdown)
            self._exporter = None

    async def __aenter__(self) -> Advisor:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
