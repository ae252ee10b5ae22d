"""The Quickstart task: its check value is the goal's expression, and it runs through the real python tool
with scripted models: a miscopied program, the check's rejection, a restart the frontier solves."""

import re
from pathlib import Path

import yaml

from advisor import Advisor, load_task
from advisor.endpoints import make_endpoint
from advisor.testing import Reply, ScriptedServer, ScriptedToolCall

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart"


def _expression(goal: str) -> str:
    m = re.search(r"Compute (.+?) exactly", goal)
    assert m, goal
    return m[1]


def test_check_value_is_the_goals_expression():
    task = load_task(EXAMPLE / "task.yaml", check_env=False)
    expr = _expression(task.goal)
    assert re.fullmatch(r"[\d\s()*%+\-]+", expr)  # digits and operators only: safe to evaluate
    assert task.check.value == str(eval(expr))  # noqa: S307
    assert task.escalation.mode == "restart" and [t.name for t in task.tool_specs()] == ["python"]


def test_endpoints_are_the_shipped_embedded_pair():
    eps = yaml.safe_load((EXAMPLE / "advisor.yaml").read_text())["endpoints"]
    assert {k: (v["provider"], v["model"]) for k, v in eps.items()} == {
        "flash": ("embedded", "step-nano"),
        "frontier": ("embedded", "step-nano-large"),
    }
    assert eps["flash"]["price"] == {"input": 0.20, "cached_input": 0.04, "output": 1.15}
    hosted = yaml.safe_load((EXAMPLE / "advisor.hosted.yaml").read_text())["endpoints"]
    assert hosted["flash"]["provider"] == "openai" and hosted["frontier"]["provider"] == "anthropic"


async def test_quickstart_runs_with_the_real_python_tool(tmp_path: Path):
    task = load_task(EXAMPLE / "task.yaml", check_env=False)
    expr = _expression(task.goal)
    wrong = expr.replace("*", "+", 1)  # a miscopied program

    def printed(req) -> str:
        return [m for m in req["messages"] if m["role"] == "tool"][-1]["content"].strip()

    def executor(req):
        if any(m["role"] == "tool" for m in req["messages"]):
            return Reply(text=f"Answer: {printed(req)}")
        return Reply(tool_calls=[ScriptedToolCall("python", {"code": f"print({wrong})"})])

    def frontier(req):  # the restart: the opening messages only, no trace of the failed attempt
        assert [m["role"] for m in req["messages"]][:2] == ["system", "user"]
        assert not any("not correct" in str(m["content"]) for m in req["messages"])
        if any(m["role"] == "tool" for m in req["messages"]):
            return Reply(text=f"Answer: {printed(req)}")
        return Reply(tool_calls=[ScriptedToolCall("python", {"code": f"print({expr})"})])

    with ScriptedServer({"flash": executor, "frontier": frontier}) as server:
        endpoints = {
            "flash": make_endpoint("flash", server.endpoint_config("flash")),
            "frontier": make_endpoint("frontier", server.endpoint_config("frontier")),
        }
        async with Advisor(runs_dir=tmp_path, endpoints=endpoints) as adv:
            result = await adv.run(task)
        for ep in endpoints.values():
            await ep.aclose()
    assert result.outcome == "passed", result
    assert result.answer == task.check.value and result.consults == 1 and result.steps == 4
