"""What runs in a Ray worker: one task attempt, its trace events yielded to the driver as they happen.

`run_attempt` is a Ray streaming generator. It unpacks the task's files in a temporary folder, runs the
same `TaskLoop` a local run does (its trace written there too, then thrown away) and yields, first, where it
runs (`{"placed": {"ray_node", "hostname"}}`), then each trace event (`{"event": ...}`) the moment the loop
emits it; the last event is `task_end`, which carries the result. The driver writes the events; nothing of
the attempt stays on the worker.

Each worker process keeps one event loop (in a thread of its own) and one `Loops` for all the attempts
Ray gives it, one after the other: endpoints, their connection pools, MCP servers and an embedded model
are made once per process and kept, as in a local run.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import ray

from advisor.cluster.bundle import unpack
from advisor.cluster.limiter import RayGate
from advisor.loops import Loops
from advisor.task import Task

_DONE = object()


class _Runtime:
    """This worker process's event loop and shared endpoints."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="advisor-worker-loop", daemon=True).start()
        self.scratch = Path(tempfile.mkdtemp(prefix="advisor-worker-"))
        self.loops = Loops(fsync=False)  # the trace here is thrown away: the driver's copy is the one kept


_runtime: _Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> _Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = _Runtime()
        return _runtime


def placement() -> dict:
    return {"ray_node": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}


@ray.remote(max_retries=0)
def run_attempt(
    task: Task, archive: bytes | None, strategy: str, attempt: str, limiter, max_usd, run_id: str | None = None
):
    """One attempt at `task` (its paths as `bundle.shipped` made them, `archive` their files)."""
    where = placement()
    yield {"placed": where, "pid": os.getpid()}
    rt = runtime()
    root = Path(tempfile.mkdtemp(prefix="attempt-", dir=rt.scratch))
    events: queue.SimpleQueue = queue.SimpleQueue()
    fut = None
    try:
        here = unpack(task, archive, root / "task")
        gate = RayGate(limiter, attempt, max_usd)

        async def go():
            loop = rt.loops.loop_for(
                here,
                strategy,
                root / "out",
                listeners=[events.put],
                gate=gate,
                placement=where,
                run_id=run_id,
            )
            return await loop.run()

        fut = asyncio.run_coroutine_threadsafe(go(), rt.loop)
        fut.add_done_callback(lambda _: events.put(_DONE))
        while (event := events.get()) is not _DONE:
            yield {"event": event}
        fut.result()  # an exception outside the loop's own handling reaches the driver as a RayTaskError
    finally:
        if fut is not None and not fut.done():  # the driver cancelled this attempt
            fut.cancel()
        shutil.rmtree(root, ignore_errors=True)
