"""End to end: `advisor eval` / `advisor report` against a real ScriptedServer on 127.0.0.1."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from advisor.cli import main
from advisor.messages import Usage
from advisor.pricing import Price
from advisor.testing import Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage

EXEC_USAGE = ScriptedUsage(prompt_tokens=1000, cached_tokens=400, completion_tokens=50, reasoning_tokens=10)
FRONTIER_USAGE = ScriptedUsage(prompt_tokens=2000, completion_tokens=300)
FLASH = {"input": 0.20, "cached_input": 0.04, "output": 1.15}
FRONTIER = {"input": 5.0, "cached_input": 0.5, "output": 25.0}
# task id -> (answer, hard): the executor alone gets hard ones wrong unless the frontier advised it
TASKS = {"t0": ("42", False), "t1": ("17", True), "t2": ("1000", False), "t3": ("9", True)}
ID = re.compile(r"Task (t\d+):")


def task_id(body: dict) -> str:
    return ID.search(json.dumps(body)).group(1)


def executor(body: dict) -> Reply:
    answer, hard = TASKS[task_id(body)]
    if hard and "ADVICE" not in json.dumps(body):
        answer = "-1"
    return Reply(text=f"Answer: {answer}", usage=EXEC_USAGE)


def frontier(body: dict) -> Reply:
    answer, _ = TASKS[task_id(body)]
    return Reply(text=f"ADVICE: the answer is {answer}.\nAnswer: {answer}", usage=FRONTIER_USAGE)


@pytest.fixture
def server():
    with ScriptedServer({"flash": executor, "frontier": frontier}) as s:
        yield s


def make_suite(tmp: Path, server: ScriptedServer) -> Path:
    d = tmp / "suite"
    d.mkdir()
    rows = [{"name": t, "prompt": f"Task {t}: give the number.", "answer": a} for t, (a, _) in TASKS.items()]
    (d / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    suite = {
        "name": "scripted",
        "endpoints": {
            "flash": {
                "provider": "openai",
                "base_url": server.base_url,
                "model": "flash",
                "price": FLASH,
                "max_retries": 0,
            },
            "frontier": {
                "provider": "openai",
                "base_url": server.base_url,
                "model": "frontier",
                "price": FRONTIER,
                "max_retries": 0,
            },
        },
        "defaults": {
            "executor": {"endpoint": "flash"},
            "frontier": {"endpoint": "frontier"},
            "escalation": {"after_failures": 5, "at": ["replan"], "max_consults": 2},
            "budget": {"max_usd": 1.0, "max_steps": 6, "max_wall_s": 30},
            "check": {"max_attempts": 2},
        },
        "tasks": ["tasks.jsonl"],
        "strategies": {"advisor-takeover": {"base": "advisor", "escalation": {"mode": "takeover"}}},
    }
    (d / "suite.yaml").write_text(yaml.safe_dump(suite), encoding="utf-8")
    return d / "suite.yaml"


def run_eval(suite: Path, out: Path, strategies: str = "executor,frontier,advisor") -> int:
    return main(
        ["eval", str(suite), "--strategies", strategies, "--concurrency", "8", "--out", str(out), "--quiet"]
    )


def ledger(out: Path, prices: dict | None = None) -> dict:
    """Totals straight from result.json files (tokens) and traces (cost_usd), independent of evals code."""
    sums: dict = {}
    for res_path in sorted(out.glob("*/*/result.json")):
        res = json.loads(res_path.read_text())
        s = sums.setdefault(
            res_path.parent.parent.name, {"tasks": 0, "solved": 0, "usd": 0.0, "outcomes": {}}
        )
        s["tasks"] += 1
        s["solved"] += res["outcome"] == "passed"
        s["outcomes"][res["task"]] = res["outcome"]
        if prices is None:
            for line in (res_path.parent / "trace.jsonl").read_text().splitlines():
                ev = json.loads(line)
                if ev["type"] == "model_call":
                    s["usd"] += ev["cost_usd"]
        else:
            for role, endpoint in (("executor", "flash"), ("frontier", "frontier")):
                t = res["tokens"][role]
                s["usd"] += Price(**prices[endpoint]).cost(Usage(**{k: t[k] for k in t}))
    return sums


def test_eval_report_matches_ledger_and_resumes(tmp_path, server):
    suite = make_suite(tmp_path, server)
    out = tmp_path / "out"
    assert run_eval(suite, out, "executor,frontier,advisor,advisor-takeover") == 0
    res = json.loads((out / "results.json").read_text())
    sums = ledger(out)
    assert res["strategies"] == ["executor", "frontier", "advisor", "advisor-takeover"]
    # failure pattern: the executor alone fails the hard tasks; frontier and advisor solve all
    assert sums["executor"]["outcomes"] == {"t0": "passed", "t1": "failed", "t2": "passed", "t3": "failed"}
    assert sums["frontier"]["solved"] == 4 and sums["advisor"]["solved"] == 4
    for s, st in res["stats"].items():
        assert st["tasks"] == sums[s]["tasks"] == 4
        assert st["solved"] == sums[s]["solved"]
        assert round(st["total_usd"], 2) == round(sums[s]["usd"], 2)
        assert st["total_usd"] == pytest.approx(sums[s]["usd"], abs=1e-9)
        assert st["usd_per_task"] == pytest.approx(sums[s]["usd"] / 4)
    # known token counts: frontier strategy = one frontier call per task
    assert res["stats"]["frontier"]["tokens"]["frontier"]["input"] == 4 * 2000
    assert res["stats"]["frontier"]["total_usd"] == pytest.approx(4 * (2000 * 5.0 + 300 * 25.0) / 1e6)
    # advisor consulted on exactly the two hard tasks, after the rejected answer
    adv = [c for c in res["consults"] if c["strategy"] == "advisor"]
    assert sorted(c["task"] for c in adv) == ["t1", "t3"]
    assert all(c["trigger"] == "replan" and c["passed_after"] for c in adv)
    assert all(c["cost_usd"] == pytest.approx((2000 * 5.0 + 300 * 25.0) / 1e6) for c in adv)
    h = res["headline"]["advisor"]
    assert h["cost_per_solved_ratio"] == pytest.approx(
        res["stats"]["advisor"]["usd_per_solved"] / res["stats"]["frontier"]["usd_per_solved"]
    )
    assert res["break_even"]["advisor"]["monthly_usd"]["10000"] == pytest.approx(
        res["stats"]["advisor"]["usd_per_task"] * 10000
    )
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and 'src="http' not in html
    assert "Per strategy" in (out / "report.md").read_text()

    # resume: one task's result is lost and another was killed mid-run (trace, no result.json)
    (out / "advisor" / "t1" / "result.json").unlink()
    shutil.rmtree(out / "frontier" / "t2")
    (out / "frontier" / "t2").mkdir()
    (out / "frontier" / "t2" / "trace.jsonl").write_text('{"seq": 0, "type": "task_start"}\n')
    before = len(server.requests)
    assert run_eval(suite, out, "executor,frontier,advisor,advisor-takeover") == 0
    again = server.requests[before:]
    assert again and {task_id(r.body) for r in again} == {"t1", "t2"}
    assert {r.model for r in again if task_id(r.body) == "t2"} == {"frontier"}
    assert list((out / ".aborted" / "frontier").iterdir())[0].name.startswith("t2-")
    assert json.loads((out / "results.json").read_text())["stats"]["advisor"]["solved"] == 4


def test_reprice_changes_only_costs(tmp_path, server):
    suite = make_suite(tmp_path, server)
    out = tmp_path / "out"
    assert run_eval(suite, out) == 0
    first = json.loads((out / "results.json").read_text())
    n_requests = len(server.requests)
    new = {
        "flash": {"input": 0.5, "cached_input": 0.1, "output": 2.0},
        "frontier": {"input": 1.0, "output": 4.0},
    }
    (tmp_path / "prices.yaml").write_text(yaml.safe_dump({"prices": new}))
    assert main(["report", str(out), "--prices", str(tmp_path / "prices.yaml")]) == 0
    assert len(server.requests) == n_requests  # no model call
    second = json.loads((out / "results.json").read_text())
    sums = ledger(out, new)
    for s in first["strategies"]:
        a, b = first["stats"][s], second["stats"][s]
        for k in ("tasks", "solved", "success_rate", "outcomes", "tokens", "consults", "latency_s"):
            assert a[k] == b[k], k
        assert b["total_usd"] == pytest.approx(sums[s]["usd"], abs=1e-12)
        assert b["total_usd"] != pytest.approx(a["total_usd"])
    assert {t: {s: v["outcome"] for s, v in row.items()} for t, row in first["per_task"].items()} == {
        t: {s: v["outcome"] for s, v in row.items()} for t, row in second["per_task"].items()
    }
    # frontier-only estimate re-priced too: all tokens at the new frontier price
    fr = second["stats"]["executor"]
    toks = fr["tokens"]["executor"]
    assert fr["frontier_only_estimate_usd"] == pytest.approx(Price(**new["frontier"]).cost(Usage(**toks)))
    assert "prices.yaml" in (out / "report.md").read_text()


def test_bad_input_is_one_line(tmp_path, server, capsys):
    suite = make_suite(tmp_path, server)
    assert run_eval(suite, tmp_path / "o", "executor,nonsense") == 2
    err = capsys.readouterr().err.strip()
    assert "unknown strategy 'nonsense'" in err and "\n" not in err
    (tmp_path / "p.yaml").write_text("flash: {input: -1, output: 1}\n")
    (tmp_path / "o").mkdir(exist_ok=True)
    assert main(["report", str(tmp_path / "o"), "--prices", str(tmp_path / "p.yaml")]) == 2
    assert "flash.input" in capsys.readouterr().err


def test_restart_consults_are_booked_with_their_mode_and_the_frontier_steps_they_paid_for(tmp_path, server):
    # the Quickstart's mode: a rejected answer restarts the conversation with the frontier taking the first
    # steps; those steps are what the consult cost, in results.json, report.md and report.html alike
    suite = make_suite(tmp_path, server)
    spec = yaml.safe_load(suite.read_text())
    spec["strategies"]["advisor-restart"] = {"base": "advisor", "escalation": {"mode": "restart"}}
    suite.write_text(yaml.safe_dump(spec), encoding="utf-8")
    out = tmp_path / "out"
    assert run_eval(suite, out, "advisor-restart") == 0
    res = json.loads((out / "results.json").read_text())
    consults = res["consults"]
    assert sorted(c["task"] for c in consults) == ["t1", "t3"]
    frontier_call = (2000 * 5.0 + 300 * 25.0) / 1e6
    for c in consults:
        assert c["mode"] == "restart" and c["passed_after"]
        # every frontier call of the task came after its one restart: all of them are the consult's cost
        trace = [json.loads(line) for line in (out / "advisor-restart" / c["task"] / "trace.jsonl").open()]
        paid = [e["cost_usd"] for e in trace if e["type"] == "model_call" and e["role"] == "frontier"]
        assert paid and c["cost_usd"] == pytest.approx(sum(paid)) == pytest.approx(frontier_call * len(paid))
    md = (out / "report.md").read_text()
    ledger_rows = [line for line in md.splitlines() if line.startswith("| advisor-restart | t")]
    assert len(ledger_rows) == 2 and all("| restart |" in r and "advise" not in r for r in ledger_rows)
    assert frontier_call == 0.0175 and all("| $0.0175 |" in r for r in ledger_rows)
    html = (out / "report.html").read_text()
    assert html.count(">restart<") == 2 and ">advise<" not in html
def tool_executor(body: dict) -> Reply:
    """As `executor`, but a hard task calls the advisor tool first when it is offered."""
    answer, hard = TASKS[task_id(body)]
    offered = any(t["function"]["name"] == "advisor" for t in body.get("tools") or [])
    advised = "ADVICE" in json.dumps(body)
    if hard and offered and not advised:
        return Reply(tool_calls=[ScriptedToolCall("advisor", {})], usage=EXEC_USAGE)
    return Reply(text=f"Answer: {answer if advised or not hard else '-1'}", usage=EXEC_USAGE)


def test_policy_tool_and_combined_strategies_side_by_side(tmp_path):
    with ScriptedServer({"flash": tool_executor, "frontier": frontier}) as server:
        suite = make_suite(tmp_path, server)
        out = tmp_path / "out"
        assert run_eval(suite, out, "advisor,advisor-tool,combined") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["strategies"] == ["advisor", "advisor-tool", "combined"]
    st = res["stats"]
    assert all(st[s]["solved"] == 4 and st[s]["consults_per_task"] == 0.5 for s in res["strategies"])
    # the policy consults after the rejected answer; the executor asks before answering
    assert st["advisor"]["consults_by_trigger"] == {"replan": 2}
    assert st["advisor-tool"]["consults_by_trigger"] == {"tool": 2}
    assert st["combined"]["consults_by_trigger"] == {"tool": 2}
    # the same calls each way here (two executor calls and a consult per hard task): the same cost
    assert st["advisor-tool"]["usd_per_solved"] == pytest.approx(st["advisor"]["usd_per_solved"])
    report = (out / "report.md").read_text()
    assert "consults by trigger" in report and "tool 0.50" in report and "replan 0.50" in report
