"""The run's limits in one process: an endpoint's max_concurrency and the run's max_usd, held across
concurrent tasks against a real ScriptedServer on 127.0.0.1 (it counts the requests it answers at once)."""

import asyncio
import threading

import pytest

from advisor import Advisor, Task
from advisor.limits import LocalGate, SpendLimitReached
from advisor.testing import Reply, ScriptedServer, ScriptedUsage
from advisor.trace import read_trace

CALL_USD = 1.0  # each scripted call: a million input tokens at $1 per million
PRICE = {"input": 1.0, "cached_input": 1.0, "output": 0.0}


def tasks(server: ScriptedServer, n: int, *, max_concurrency=None, check_value="42") -> list[Task]:
    cfg = server.endpoint_config("flash", price=PRICE, max_concurrency=max_concurrency, max_retries=0)
    return [
        Task.model_validate(
            {
                "name": f"t{i:02d}",
                "goal": "Answer 42.",
                "executor": {"endpoint": "flash"},
                "check": {"type": "equals", "value": check_value, "max_attempts": 3},
                "budget": {"max_usd": 100.0, "max_wall_s": 60},
                "endpoints": {"flash": cfg.model_dump()},
            }
        )
        for i in range(n)
    ]


def first_waits_for_company(server: ScriptedServer, model: str, reply: Reply):
    """A script whose first request is answered only once a second one is in flight (or after 20 s), so
    a peak of two is reached whatever the machine's speed; the others answer at once."""
    first = threading.Event()

    def answer(body: dict) -> Reply:
        if not first.is_set():
            first.set()
            for _ in range(2000):
                if server.peak_in_flight(model) >= 2:  # the others come and go between two looks
                    break
                threading.Event().wait(0.01)
        return reply

    return answer


async def test_endpoint_max_concurrency_holds_across_tasks(tmp_path):
    usage = ScriptedUsage(prompt_tokens=10, completion_tokens=2)
    with ScriptedServer() as server:
        server.script("flash", first_waits_for_company(server, "flash", Reply(text="42", usage=usage)))
        async with Advisor(runs_dir=tmp_path, fsync=False) as adv:
            results = await adv.run_many(tasks(server, 20, max_concurrency=2), concurrency=20)
        assert [r.outcome for r in results] == ["passed"] * 20
        assert server.peak_in_flight("flash") == 2
        assert adv.gate.peak == {"flash": 2} and adv.gate.in_flight == {"flash": 0}


async def test_run_budget_stops_new_calls_and_is_overrun_by_calls_in_flight_only(tmp_path):
    usage = ScriptedUsage(prompt_tokens=1_000_000, completion_tokens=1)  # $1 a call
    with ScriptedServer({"flash": lambda body: Reply(text="wrong", usage=usage)}) as server:
        async with Advisor(runs_dir=tmp_path, fsync=False, max_usd=5.0) as adv:
            results = await adv.run_many(tasks(server, 10, max_concurrency=2), concurrency=10)
        calls = len(server.requests)
    spent = sum(r.cost_usd["total"] for r in results)
    assert spent == pytest.approx(calls * CALL_USD) == pytest.approx(adv.gate.spent)
    assert 5.0 <= spent <= 5.0 + 2 * CALL_USD  # at most the two calls in flight past the budget
    stopped = [r for r in results if r.outcome == "budget_exceeded"]
    assert stopped and all("run max_usd 5.0 reached" in r.error for r in stopped)
    trace = read_trace(tmp_path / adv.run_id / stopped[0].task / "trace.jsonl")
    assert [e["limit"] for e in trace if e["type"] == "budget_exceeded"] == ["run_max_usd"]


async def test_local_gate_refuses_once_spent_and_frees_slots():
    gate = LocalGate(max_usd=1.0)
    a = await gate.acquire("x", 1)
    waiting = asyncio.ensure_future(gate.acquire("x", 1))
    await asyncio.sleep(0)
    assert not waiting.done()  # one slot, held
    await gate.release(a, 1.0)  # the budget is spent while the second call waits
    with pytest.raises(SpendLimitReached):
        await waiting
    assert gate.in_flight == {"x": 0}
    with pytest.raises(SpendLimitReached):
        await gate.acquire("y", None)
