"""The Ray backend's cost against the local one, side by side in one run, and the driver's memory.

    python -m advisor.evals.bench_ray [--tasks 200] [--memory-tasks 1000] [--concurrency 16] [--cpus 8]
                                      [--address ADDRESS]

Every task is one scripted model call (a ScriptedServer on 127.0.0.1 answers at once) and an `equals`
check, so what is timed is the backend's own work: for Ray, shipping the task, a worker running its loop,
the events streaming back and the driver writing them. Each backend runs `--tasks` tasks one at a time
(the overhead one task pays) and `--concurrency` at a time (what a batch pays per task), after a warm-up
batch that starts Ray's worker processes (its time is printed apart: a cold start, paid once per worker
process). Then `--memory-tasks` tasks run on Ray while a thread samples the driver's resident memory
(/proc/self/statm): its peak against its level before. Without --address a local Ray with `--cpus`
logical CPUs is started for the run. Traces are written without fsync on both sides.

On a real cluster the workers are on other machines: each event crosses the network once more (Ray's
object transfer from the worker's node to the driver's), which adds its round trip to an event's latency
but not to the driver's work; the driver's memory stays what it is here, since it holds only the tasks in
flight.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

from advisor.runner import Advisor
from advisor.task import Task
from advisor.testing import Reply, ScriptedServer, ScriptedUsage

PAGE = resource.getpagesize()


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


class Sampler:
    """The driver's resident memory, sampled every 20 ms in a thread: its peak."""

    def __init__(self) -> None:
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def make_tasks(server: ScriptedServer, n: int, prefix: str) -> list[Task]:
    cfg = server.endpoint_config("flash", max_retries=0).model_dump()
    return [
        Task.model_validate(
            {
                "name": f"{prefix}{i:04d}",
                "goal": "Answer 42.",
                "executor": {"endpoint": "flash"},
                "check": {"type": "equals", "value": "42"},
                "endpoints": {"flash": cfg},
            }
        )
        for i in range(n)
    ]


async def timed(adv: Advisor, tasks: list[Task], concurrency: int) -> float:
    t0 = time.perf_counter()
    results = await adv.run_many(tasks, concurrency=concurrency)
    wall = time.perf_counter() - t0
    bad = [r for r in results if not r.passed]
    if bad:
        raise SystemExit(f"bench task {bad[0].task} did not pass: {bad[0].outcome} {bad[0].error}")
    return wall


async def bench(args: argparse.Namespace, server: ScriptedServer, root: Path) -> None:
    n, c = args.tasks, args.concurrency
    rows: list[tuple[str, int, float]] = []
    warm: dict[str, float] = {}
    for backend in ("local", "ray"):
        options = {"backend": backend, "ray_address": args.address} if backend == "ray" else {}
        async with Advisor(runs_dir=root / backend, fsync=False, **options) as adv:
            await adv.start()
            warm[backend] = await timed(adv, make_tasks(server, c, "warm"), c)
            for conc in (1, c):
                wall = await timed(adv, make_tasks(server, n, f"c{conc}-"), conc)
                rows.append((backend, conc, wall))
    print(f"per-task cost, {n} scripted tasks of one model call each (ms per task)")
    print(f"{'backend':8} {'at once':>8} {'wall s':>8} {'ms/task':>8}")
    for backend, conc, wall in rows:
        print(f"{backend:8} {conc:8d} {wall:8.2f} {wall / n * 1000:8.1f}")
    by = {(b, conc): wall / n * 1000 for b, conc, wall in rows}
    for conc in (1, c):
        extra = by[("ray", conc)] - by[("local", conc)]
        print(
            f"Ray overhead at {conc} at once: {extra:+.1f} ms per task "
            f"({by[('ray', conc)] / by[('local', conc)]:.1f}x local)"
        )
    print(
        f"warm-up batch of {c} (Ray: worker processes starting): local {warm['local']:.2f} s, "
        f"ray {warm['ray']:.2f} s"
    )

    m = args.memory_tasks
    for backend in ("local", "ray"):
        options = {"backend": backend, "ray_address": args.address} if backend == "ray" else {}
        async with Advisor(runs_dir=root / f"mem-{backend}", fsync=False, **options) as adv:
            await adv.start()
            before = rss_mb()
            with Sampler() as s:
                wall = await timed(adv, make_tasks(server, m, "m"), c)
        print(
            f"driver memory, {m} tasks {c} at once on {backend}: {before:.0f} MiB before, peak {s.peak:.0f} MiB "
            f"(+{s.peak - before:.0f} MiB), {wall:.1f} s"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m advisor.evals.bench_ray", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--memory-tasks", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--cpus", type=int, default=8, help="logical CPUs of the local Ray (no --address)")
    p.add_argument("--address", default=None, help="a running cluster (default: a local Ray for the run)")
    args = p.parse_args(argv)
    import ray

    if args.address is None:
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
    usage = ScriptedUsage(prompt_tokens=100, completion_tokens=5)
    with ScriptedServer({"flash": lambda body: Reply(text="Answer: 42", usage=usage)}) as server:
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            asyncio.run(bench(args, server, Path(tmp)))
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
