"""The driver's side of a Ray run: each task attempt submitted as a Ray task, its events written here.

`RayBackend.run(task, strategy, out, listeners)` does for one task what a local `TaskLoop.run` does, with
the loop running in a Ray worker: the events it streams back are written to `out/trace.jsonl` as they
arrive (append-only, flushed and fsynced per event, the listeners called, as a local run does), and the
result, which arrives in the `task_end` event, is written to `out/result.json` and `out/report.md` with
`ray_node` and `hostname` in it.

A worker or node that dies mid-task (a Ray system error, not an exception in the task) ends that attempt:
its partial trace moves to `.aborted/` (as a killed local run's does), the calls it had made are added up
from the events already written there and booked as the result's `aborted` spend (beside its cost, not
in it), its permits go back to the limiter, and the task runs again from the start on whatever nodes are
alive, up to `max_attempts` attempts in all. The retries are the driver's, not Ray's (`max_retries=0`):
Ray replays a streaming generator's retry against the objects the first attempt already yielded, which
only works for a generator that yields the same items every time, and an agent loop never does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import ray
from ray.exceptions import RayError, RayTaskError, TaskCancelledError

from advisor.aborted import Spend, set_aside
from advisor.cluster import bundle
from advisor.cluster.connect import connect
from advisor.cluster.limiter import start_limiter
from advisor.cluster.worker import run_attempt
from advisor.result import TaskResult
from advisor.task import Task
from advisor.trace import Trace

DEFAULT_TASK_OPTIONS = {"num_cpus": 1, "scheduling_strategy": "SPREAD"}


class RayBackend:
    def __init__(
        self,
        cluster: str,
        limiter,
        *,
        max_usd: float | None,
        fsync: bool,
        max_attempts: int,
        task_options: dict,
    ):
        self.cluster = cluster  # "Ray cluster at ...: N nodes, C CPUs"
        self.limiter = limiter
        self.max_usd = max_usd
        self.fsync = fsync
        self.max_attempts = max(1, max_attempts)
        self.task_options = {**DEFAULT_TASK_OPTIONS, **task_options, "max_retries": 0}
        self._archives: dict[tuple, ray.ObjectRef] = {}
        self._packing: dict[tuple, asyncio.Lock] = {}

    @classmethod
    async def connect(
        cls,
        address: str | None,
        *,
        max_usd: float | None = None,
        fsync: bool = True,
        max_attempts: int = 3,
        **task_options,
    ) -> RayBackend:
        """Connects to the cluster (`ClusterError`, one line, when it cannot be reached) and starts the
        run's limiter actor."""
        cluster = await asyncio.to_thread(connect, address)
        limiter = await asyncio.to_thread(start_limiter, max_usd)
        return cls(
            cluster,
            limiter,
            max_usd=max_usd,
            fsync=fsync,
            max_attempts=max_attempts,
            task_options=task_options,
        )

    async def limits(self) -> dict:
        """The limiter's books: spend, calls, calls in flight and their peak per endpoint."""
        return await self.limiter.stats.remote()

    async def _archive(self, task: Task) -> ray.ObjectRef | None:
        """The task's files in the object store, packed and put once per source (strategies share it)."""
        if not bundle.needs_files(task):
            return None
        key = bundle.key(task)
        async with self._packing.setdefault(key, asyncio.Lock()):
            if key not in self._archives:
                data = await asyncio.to_thread(bundle.pack, task)
                self._archives[key] = await asyncio.to_thread(ray.put, data)
        return self._archives[key]

    async def run(
        self,
        task: Task,
        strategy: str,
        out: Path,
        listeners: list[Callable[[dict], None]],
        run_id: str | None = None,
    ) -> TaskResult:
        archive = await self._archive(task)
        sent = bundle.shipped(task)
        aborted, traces, why = Spend(), [], ""
        for number in range(1, self.max_attempts + 1):
            attempt = f"{task.name}/{strategy}/{number}/{uuid.uuid4().hex[:8]}"
            trace = await asyncio.to_thread(self._trace, out, listeners)
            seen = Spend()
            end: dict | None = None
            gen = run_attempt.options(**self.task_options).remote(
                sent, archive, strategy, attempt, self.limiter, self.max_usd, run_id
            )
            try:
                async for ref in gen:
                    item = await ref
                    event = item.get("event")
                    if event is not None:
                        trace.append(event)
                        seen.add(event)
                        if event.get("type") == "task_end":
                            end = event
            except asyncio.CancelledError:  # Ctrl-C: the attempt stops with the driver
                try:
                    ray.cancel(gen, force=True)
                except Exception:  # already finished, or its worker gone: nothing left to stop
                    pass
                await asyncio.to_thread(trace.close)
                raise
            except RayTaskError as e:  # our code raised in the worker: the task's error, not a death
                return await self._failed(_error(task, strategy, e, seen), trace, out, aborted, traces)
            except RayError as e:
                if end is None and not isinstance(e, TaskCancelledError):  # the worker or its node died
                    await asyncio.to_thread(trace.close)
                    await self.limiter.forget.remote(attempt)
                    moved = await asyncio.to_thread(set_aside, out)
                    aborted = aborted + seen
                    traces.append(_relative(moved, out))
                    why = f"{type(e).__name__}: {_first_line(e)}"
                    continue
                if end is None:
                    return await self._failed(_error(task, strategy, e, seen), trace, out, aborted, traces)
            if end is None:  # the stream ended without a task_end: cannot happen short of a bug
                lost = _error(task, strategy, "the worker's event stream ended before task_end", seen)
                return await self._failed(lost, trace, out, aborted, traces)
            await asyncio.to_thread(trace.close)
            return await self._finish(TaskResult.from_dict(end["result"]), out, aborted, traces)
        failed = TaskResult(
            task.name,
            strategy,
            "error",
            error=f"the Ray worker died on each of {self.max_attempts} attempts (last: {why})",
        )
        trace = await asyncio.to_thread(self._trace, out, listeners)
        return await self._failed(failed, trace, out, aborted, traces)

    def _trace(self, out: Path, listeners: list[Callable[[dict], None]]) -> Trace:
        out.mkdir(parents=True, exist_ok=True)
        return Trace(out / "trace.jsonl", fsync=self.fsync, listeners=listeners)

    async def _failed(
        self, result: TaskResult, trace: Trace, out: Path, aborted: Spend, traces: list[str]
    ) -> TaskResult:
        """Closes the trace the way the format says (a task_end with the error result) and writes it."""
        trace.emit("task_end", outcome="error", error=result.error, result=result.to_dict())
        await asyncio.to_thread(trace.close)
        return await self._finish(result, out, aborted, traces)

    async def _finish(self, result: TaskResult, out: Path, aborted: Spend, traces: list[str]) -> TaskResult:
        result.out_dir = str(out)
        if traces:
            result.aborted = {
                "attempts": len(traces),
                "model_calls": aborted.model_calls,
                "cost_usd": aborted.cost_usd["total"],
                "tokens": aborted.tokens,
                "traces": traces,
            }
        await asyncio.to_thread(result.write, out)
        return result

    async def aclose(self) -> None:
        """Stops the limiter (the cluster itself stays up; a local Ray ends with this process)."""
        if self.limiter is not None:
            ray.kill(self.limiter)
            self.limiter = None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _relative(moved: Path | None, out: Path) -> str:
    if moved is None:
        return ""
    try:
        return str(moved.relative_to(out.parent.parent))
    except ValueError:
        return str(moved)


def _error(task: Task, strategy: str, e: BaseException | str, seen: Spend) -> TaskResult:
    """An error result that still carries what the attempt's events say was spent."""
    if isinstance(e, RayTaskError):
        cause = e.cause if getattr(e, "cause", None) is not None else e
        text = f"{type(cause).__name__}: {_first_line(cause)}"
    elif isinstance(e, BaseException):
        text = f"{type(e).__name__}: {_first_line(e)}"
    else:
        text = e
    return TaskResult(
        task.name,
        strategy,
        "error",
        error=text,
        model_calls=seen.model_calls,
        tokens=seen.tokens,
        cost_usd={**seen.cost_usd, "frontier_only_estimate": 0.0},
    )
