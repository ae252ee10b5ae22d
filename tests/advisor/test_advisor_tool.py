"""The executor's own consults: the `advisor` tool of `escalation.advisor_tool`, against a real scripted
server on 127.0.0.1 (an OpenAI executor, an Anthropic frontier)."""

import json
from pathlib import Path

import pytest

from advisor import Advisor, Task
from advisor.pricing import Price
from advisor.task import TaskError
from advisor.testing import HTTPError, Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage
from advisor.trace import read_trace

FLASH = Price(input=0.20, cached_input=0.04, output=1.15)
FRONTIER = Price(input=5.0, cached_input=0.5, output=25.0)
ADVICE = "Multiply first: print(6*7), then answer with the number only."


def make_task(server: ScriptedServer, **escalation) -> Task:
    return Task(
        name="six-times-seven",
        goal="Compute 6*7 with the python tool. Answer with the number only.",
        tools=["python"],
        executor={"endpoint": "flash"},
        frontier={"endpoint": "frontier", "effort": "high"},
        escalation=escalation,
        budget={"max_usd": 0.5, "max_steps": 10, "max_wall_s": 60},
        check={"type": "equals", "value": "42"},
        endpoints={
            "flash": server.endpoint_config("flash", price=FLASH, free=False),
            "frontier": server.endpoint_config("frontier", "anthropic", price=FRONTIER, free=False),
        },
    )


def advisor_call() -> Reply:
    return Reply(tool_calls=[ScriptedToolCall("advisor", {})])


def finish() -> list:
    return [
        Reply(tool_calls=[ScriptedToolCall("python", {"code": "print(6*7)"})]),
        "Answer: 42",
    ]


async def run(tmp_path: Path, task: Task, strategy: str = "advisor"):
    async with Advisor(runs_dir=tmp_path / "runs", fsync=False) as adv:
        result = await adv.run(task, strategy)
    return result, read_trace(Path(result.out_dir) / "trace.jsonl")


async def test_the_executor_calls_the_advisor_once(tmp_path: Path):
    usage = ScriptedUsage(prompt_tokens=2000, completion_tokens=300)
    with ScriptedServer(
        {"flash": [advisor_call(), *finish()], "frontier": [Reply(text=ADVICE, usage=usage)]}
    ) as server:
        task = make_task(server, advisor_tool={"max_uses": 2, "max_tokens": 1500})
        result, trace = await run(tmp_path, task)
        first = server.requests_for("flash")[0].body
        offered = {t["function"]["name"]: t["function"] for t in first["tools"]}
        assert offered["advisor"]["parameters"] == {"type": "object", "properties": {}}
        assert "before you" in offered["advisor"]["description"]  # when to call it
        (consult_req,) = server.requests_for("frontier")
        # the advice's cap, plus the frontier's thinking budget at effort high (the endpoint's own rule)
        assert consult_req.body["max_tokens"] == 1500 + consult_req.body["thinking"]["budget_tokens"]
        # the advice came back as the tool result of that call, and nowhere else
        second = server.requests_for("flash")[1].body["messages"]
        call_id = first_call_id = second[-2]["tool_calls"][0]["id"]
        assert second[-1] == {"role": "tool", "tool_call_id": call_id, "content": ADVICE}
        assert first_call_id and not any(m["role"] == "user" and ADVICE in json.dumps(m) for m in second)
    assert result.outcome == "passed" and result.consults == 1
    assert result.consults_by_trigger == {"tool": 1}
    assert result.tokens["frontier"]["input"] == 2000 and result.tokens["frontier"]["output"] == 300
    assert result.cost_usd["frontier"] == pytest.approx(2000 * 5.0 / 1e6 + 300 * 25.0 / 1e6)
    (consult,) = [e for e in trace if e["type"] == "consult"]
    assert consult["trigger"] == "tool" and consult["mode"] == "advise" and consult["advice"] == ADVICE
    saved = json.loads((Path(result.out_dir) / "result.json").read_text())
    assert saved["consults_by_trigger"] == {"tool": 1}


async def test_max_uses_errors_and_the_task_goes_on_and_policy_consults_share_the_budget(tmp_path: Path):
    flash = [
        Reply(tool_calls=[ScriptedToolCall("python", {"code": "1/0"})]),  # two failures: a policy consult
        Reply(tool_calls=[ScriptedToolCall("python", {"code": "2/0"})]),
        advisor_call(),
        advisor_call(),  # past max_uses: an error result
        *finish(),
    ]
    with ScriptedServer({"flash": flash, "frontier": ["Stop dividing by zero.", ADVICE]}) as server:
        task = make_task(server, after_failures=2, max_consults=3, advisor_tool={"max_uses": 1})
        result, trace = await run(tmp_path, task, "combined")
        msgs = server.requests_for("flash")[4].body["messages"]
        assert msgs[-1]["role"] == "tool" and "max_uses_exceeded" in msgs[-1]["content"]
        assert len(server.requests_for("frontier")) == 2
    assert result.outcome == "passed"
    assert result.consults == 2 and result.consults_by_trigger == {"failures": 1, "tool": 1}
    assert result.skipped_consults == 1
    skipped = [e for e in trace if e["type"] == "consult_skipped"]
    assert [(e["trigger"], e["reason"]) for e in skipped] == [("tool", "max_uses")]
    # the refused call is not a failed step of the executor
    assert [e["step"] for e in trace if e["type"] == "step_failed"] == [1, 2]


async def test_max_consults_and_a_failing_frontier_are_error_results(tmp_path: Path):
    frontier = [HTTPError(400, "the advisor is overloaded")]
    with ScriptedServer(
        {"flash": [advisor_call(), advisor_call(), *finish()], "frontier": frontier}
    ) as server:
        task = make_task(server, max_consults=1, advisor_tool={"max_uses": 5})
        result, trace = await run(tmp_path, task, "advisor-tool")
        reqs = server.requests_for("flash")
        assert "unavailable" in reqs[1].body["messages"][-1]["content"]  # the frontier failed
        assert "max_consults" in reqs[2].body["messages"][-1]["content"]  # no consult left
    # the failed consult was made (and billed what the frontier billed): it counts
    assert result.outcome == "passed" and result.consults == 1 and result.skipped_consults == 1
    assert result.consults_by_trigger == {"tool": 1}
    assert any(e["type"] == "model_call" and e["role"] == "frontier" and e["error"] for e in trace)
    (failed,) = [e for e in trace if e["type"] == "consult"]
    assert failed["trigger"] == "tool" and failed["advice"] is None and "overloaded" in failed["error"]


async def test_strategies_decide_who_consults(tmp_path: Path):
    with ScriptedServer({"flash": finish(), "frontier": []}) as server:
        task = make_task(server)  # no advisor_tool in the task
        result, _ = await run(tmp_path, task, "advisor")
        assert "advisor" not in {t["function"]["name"] for t in server.requests_for("flash")[0].body["tools"]}
        server.script("flash", finish())
        result, _ = await run(tmp_path / "b", task, "advisor-tool")
        assert "advisor" in {t["function"]["name"] for t in server.requests_for("flash")[2].body["tools"]}
    assert result.outcome == "passed"


def test_advisor_tool_settings_are_checked():
    with pytest.raises(ValueError, match="max_tokens"):
        Task(
            goal="g",
            executor={"endpoint": "x"},
            escalation={"advisor_tool": {"max_tokens": 0}},
        )
    with pytest.raises((ValueError, TaskError), match="extra|permitted"):
        Task(goal="g", executor={"endpoint": "x"}, escalation={"advisor_tool": {"uses": 2}})


def test_a_bad_advisor_tool_in_task_yaml_is_one_line_naming_the_field(tmp_path: Path):
    path = tmp_path / "task.yaml"
    path.write_text(
        "goal: g\nexecutor: {endpoint: x}\nescalation: {advisor_tool: {max_uses: -1}}\n", encoding="utf-8"
    )
    with pytest.raises(TaskError) as err:
        Task.from_yaml(path, check_env=False)
    assert "escalation.advisor_tool.max_uses" in str(err.value) and "\n" not in str(err.value)
