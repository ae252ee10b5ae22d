import asyncio
import json
import os
import threading
import time
from pathlib import Path

from advisor.bench import measure
from advisor.checks import extract_answer, run_check
from advisor.ledger import Ledger
from advisor.messages import Usage
from advisor.pricing import Price
from advisor.task import Check
from advisor.trace import Trace, read_trace


def test_trace_is_on_disk_when_each_event_is_emitted(tmp_path: Path):
    path = tmp_path / "t" / "trace.jsonl"
    seen = []

    def reader(event):  # runs right after the write: the line must already be in the file
        seen.append(len(path.read_text().splitlines()))

    tr = Trace(path, listeners=[reader])
    for i in range(3):
        tr.emit("x", i=i)
    assert seen == [1, 2, 3]
    tr.close()
    Trace(path).emit("y")  # re-opening appends, never truncates
    with open(path, "a") as fh:
        fh.write('{"seq": 9, "type": "torn')
    assert [e["type"] for e in read_trace(path)] == ["x", "x", "x", "y"]


def test_ledger_and_price():
    p = Price(input=1.0, cached_input=0.1, output=2.0, cache_write=1.25)
    u = Usage(input=1000, cached_input=2000, cache_write=400, output=300, reasoning=200)
    assert abs(p.cost(u) - (1000 + 200 + 500 + 600 + 400) / 1e6) < 1e-15
    led = Ledger(frontier_price=Price(input=10, output=20))
    led.record("executor", "e", "step", Usage(input=100, output=10), Price(input=1, output=2))
    led.record("frontier", "f", "consult", Usage(input=50, output=5), Price(input=10, output=20))
    assert led.cost_dict() == {
        "executor": 0.00012,
        "frontier": 0.0006,
        "total": 0.00072,
        "frontier_only_estimate": 0.0018,
    }
    assert led.tokens_dict()["executor"]["input"] == 100


def test_checks(tmp_path: Path):
    run = lambda c, a: asyncio.run(run_check(c, a, tmp_path)).passed  # noqa: E731
    assert extract_answer("thinking...\nAnswer: 42.17.") == "42.17."
    assert run(Check(type="equals", value="42.17"), "42.17.")
    assert run(Check(type="equals", value="1,000"), "1000.0")
    assert not run(Check(type="equals", value="42"), "43")
    assert run(Check(type="contains", value="Paris", ignore_case=True), "it is paris")
    assert run(Check(type="regex", value=r"^\d{3}$"), "123") and not run(
        Check(type="regex", value=r"^\d{3}$"), "12"
    )
    (tmp_path / "chk.py").write_text("def check(a):\n    return a.startswith('ok'), 'starts with ok'\n")
    assert run(Check(type="python", file="chk.py"), "ok then")
    (tmp_path / "bad.py").write_text("def check(a):\n    raise RuntimeError('boom')\n")
    res = asyncio.run(run_check(Check(type="python", file="bad.py"), "x", tmp_path))
    assert not res.passed and "RuntimeError: boom" in res.detail


def test_bench_runs(tmp_path: Path):
    steps, cpu_ms, wall_ms = asyncio.run(measure(3, 4, True, tmp_path))
    assert steps == 12 and cpu_ms > 0 and wall_ms > 0
    results = list(tmp_path.rglob("result.json"))
    assert len(results) == 3 and json.loads(results[0].read_text())["outcome"] == "passed"


def test_trace_fsyncs_off_the_calling_thread(tmp_path: Path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(threading.current_thread().name)
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    tr = Trace(tmp_path / "trace.jsonl")
    for i in range(5):
        tr.emit("x", i=i)
    deadline = time.monotonic() + 5
    while not synced and time.monotonic() < deadline:
        time.sleep(0.01)
    assert synced and set(synced) == {"advisor-trace-fsync"}
    tr.close()  # the last fsync happens in close(), on the caller's thread
    assert synced[-1] == threading.current_thread().name
    assert len(read_trace(tmp_path / "trace.jsonl")) == 5
