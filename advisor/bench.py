"""Framework overhead per loop step: `python -m advisor.bench`.

A zero-latency in-process endpoint answers instantly (a tool call per step, then the answer), so
all the CPU time the process spends is ours: message building, tool dispatch, ledger, trace
(written and fsynced per event, as in production). Reported as process CPU ms per step, at 1 and at
40 concurrent tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from advisor.endpoints.base import AttemptHook, ChatRequest, Endpoint, EndpointConfig
from advisor.messages import Attempt, Message, ModelResponse, ToolCall, Usage
from advisor.pricing import Price
from advisor.runner import Advisor
from advisor.task import Task
from advisor.tools.spec import tool

PRICE = Price(input=0.20, cached_input=0.04, output=1.15)


class InstantEndpoint(Endpoint):
    """Answers at once from the conversation: a tool call until `steps` calls were made, then the answer."""

    def __init__(self, name: str, steps: int):
        super().__init__(name, EndpointConfig(provider="openai", model="instant", price=PRICE))
        self.steps = steps

    async def send(self, request: ChatRequest, on_attempt: AttemptHook | None) -> ModelResponse:
        done = sum(1 for m in request.messages if m.role == "tool")
        if done < self.steps - 1:
            msg = Message.assistant(tool_calls=[ToolCall(f"c{done}", "add", {"a": done, "b": 1})])
        else:
            msg = Message.assistant("Answer: ok")
        attempt = Attempt(1, True, 200, usage=Usage(input=900, cached_input=100, output=40))
        if on_attempt:
            on_attempt(attempt)
        return ModelResponse(msg, attempt.usage, "instant", "stop", 0.0, [attempt])


@tool
async def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first
        b: second
    """
    return a + b


async def measure(concurrency: int, steps: int, fsync: bool, runs_dir: Path) -> tuple[int, float, float]:
    ep = InstantEndpoint("instant", steps)
    tasks = [
        Task(
            name=f"bench-{i}",
            goal="Add numbers, then answer ok.",
            tools=[add],
            executor={"endpoint": "instant"},
            check={"type": "equals", "value": "ok"},
            budget={"max_steps": steps + 1, "max_usd": 100},
            endpoints={"instant": ep.config},
        )
        for i in range(concurrency)
    ]
    adv = Advisor(runs_dir=runs_dir, endpoints={"instant": ep}, fsync=fsync)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    results = await adv.run_many(tasks, concurrency=concurrency)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    assert all(r.outcome == "passed" for r in results), [r.outcome for r in results]
    total_steps = sum(r.steps for r in results)
    return total_steps, cpu * 1000 / total_steps, wall * 1000 / total_steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="loop steps per task")
    ap.add_argument(
        "--proxy", action="store_true", help="measure `advisor proxy` instead (see advisor.proxy.bench)"
    )
    ap.add_argument(
        "--requests", type=int, default=2000, help="--proxy: requests per measurement at 40 sessions"
    )
    ap.add_argument(
        "--rate", type=float, default=500.0, help="--proxy: requests/s offered in the open-loop run"
    )
    ap.add_argument("--seconds", type=float, default=10.0, help="--proxy: length of the open-loop run")
    ap.add_argument(
        "--auth",
        action="store_true",
        help="--proxy: the proxy without auth against a virtual key with a budget (see advisor.proxy.bench_auth)",
    )
    ap.add_argument(
        "--pg-url-env",
        default=None,
        help="--proxy --auth: a variable holding a postgresql:// URL to measure too",
    )
    args = ap.parse_args(argv)
    if args.proxy and args.auth:
        from advisor.proxy.bench_auth import main as auth_bench

        return auth_bench(args.requests, args.pg_url_env)
    if args.proxy:
        from advisor.proxy.bench import main as proxy_bench

        return proxy_bench(args.requests, args.rate, args.seconds)
    print("| concurrent tasks | trace fsync | steps | CPU ms/step | wall ms/step |")
    print("|---:|:---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(measure(1, 5, False, Path(tmp) / "warm"))
        for conc in (1, 40):
            for fsync in (True, False):
                steps, cpu, wall = asyncio.run(
                    measure(conc, args.steps, fsync, Path(tmp) / f"{conc}-{fsync}")
                )
                print(f"| {conc} | {'yes' if fsync else 'no'} | {steps} | {cpu:.3f} | {wall:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
