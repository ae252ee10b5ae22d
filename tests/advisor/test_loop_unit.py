"""The loop against in-process fake endpoints: failures, strategies, triggers, limits, images, config."""

import asyncio
import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from rich.console import Console

from advisor import Advisor, Task, TaskError, load_task, tool
from advisor.endpoints.base import Endpoint, EndpointConfig, EndpointError
from advisor.messages import Attempt, ImagePart, Message, ModelResponse, ToolCall, Usage
from advisor.pricing import Price
from advisor.trace import read_trace

EXEC_PRICE = Price(input=0.20, cached_input=0.04, output=1.15)
FRONT_PRICE = Price(input=5.0, cached_input=0.5, output=25.0)
USAGE = Usage(input=100, cached_input=50, output=10, reasoning=5)


class FakeEndpoint(Endpoint):
    """Answers from a list of turns: a Message, a callable(messages) -> Message, or an exception."""

    def __init__(self, name: str, turns: list, price: Price, delay_s: float = 0.0):
        super().__init__(name, EndpointConfig(provider="openai", model=f"{name}-model", price=price))
        self.turns = list(turns)
        self.delay_s = delay_s
        self.calls: list[dict] = []

    async def send(self, request, on_attempt):
        messages = request.messages
        self.calls.append(
            {"messages": list(messages), "tools": request.tools, "max_tokens": request.max_tokens}
        )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        turn = self.turns.pop(0)
        if isinstance(turn, Exception):
            raise turn
        msg = turn(messages) if callable(turn) else turn
        attempt = Attempt(1, True, 200, usage=USAGE)
        if on_attempt:
            on_attempt(attempt)
        return ModelResponse(msg, USAGE, self.config.model, "stop", 0.0, [attempt])


def call(name: str, args: dict | None, raw: str = "", error: str | None = None, cid: str = "c") -> Message:
    return Message.assistant(tool_calls=[ToolCall(cid, name, args, raw, error)])


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first
        b: second
    """
    return a + b


@tool
def explode(x: int) -> str:
    """Always raises.

    Args:
        x: anything
    """
    raise ValueError(f"boom {x}")


def make(ex: FakeEndpoint, fr: FakeEndpoint | None = None, **over) -> Task:
    fields = {
        "name": "unit",
        "goal": "Add 2 and 3. Answer with the number only.",
        "tools": [add, explode],
        "executor": {"endpoint": ex.name},
        "check": {"type": "equals", "value": "5"},
        "budget": {"max_usd": 1.0, "max_steps": 10, "max_wall_s": 30},
        "endpoints": {ex.name: ex.config},
    }
    if fr is not None:
        fields["frontier"] = {"endpoint": fr.name, "effort": "high"}
        fields["endpoints"] = {ex.name: ex.config, fr.name: fr.config}
    fields.update(over)
    return Task(**fields)


async def run(tmp: Path, task: Task, *eps: FakeEndpoint, strategy: str = "advisor"):
    adv = Advisor(runs_dir=tmp, run_id="r", endpoints={e.name: e for e in eps}, fsync=False)
    result = await adv.run(task, strategy)
    events = read_trace(tmp / "r" / task.name / "trace.jsonl")
    return result, events


def kinds(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


async def test_raising_tool_and_repeated_call_are_failed_steps(tmp_path: Path):
    ex = FakeEndpoint(
        "ex",
        [
            call("explode", {"x": 1}),
            call("add", {"a": 2, "b": 3}),
            call("add", {"a": 2, "b": 3}),  # the same successful call again: no progress
            Message.assistant("Answer: 5"),
        ],
        EXEC_PRICE,
    )
    result, events = await run(tmp_path, make(ex), ex)
    assert result.outcome == "passed" and result.steps == 4
    failed = kinds(events, "step_failed")
    assert [(f["reason"], f["consecutive"]) for f in failed] == [("tool_error", 1), ("repeated_call", 1)]
    assert "ValueError: boom 1" in failed[0]["detail"]
    # the model heard about the error as its tool result
    tool_msgs = [m for m in ex.calls[1]["messages"] if m.role == "tool"]
    assert tool_msgs[0].is_error and "boom 1" in tool_msgs[0].text


async def test_endpoint_error_ends_with_error_and_keeps_billed_attempts(tmp_path: Path):
    billed = Attempt(1, False, 500, "HTTP 500", usage=Usage(input=1000, output=100))
    ex = FakeEndpoint(
        "ex",
        [call("add", {"a": 1, "b": 1}), EndpointError("ex", "HTTP 400: bad request", [billed], 400)],
        EXEC_PRICE,
    )
    result, events = await run(tmp_path, make(ex), ex)
    assert result.outcome == "error" and "HTTP 400" in result.error
    expected = EXEC_PRICE.cost(USAGE) + EXEC_PRICE.cost(Usage(input=1000, output=100))
    assert abs(result.cost_usd["total"] - expected) < 1e-12
    calls = kinds(events, "model_call")
    assert calls[-1]["error"].startswith("endpoint 'ex'") and calls[-1]["attempts"][0]["status"] == 500
    assert events[-1]["type"] == "task_end" and events[-1]["outcome"] == "error"
    assert json.loads((tmp_path / "r" / "unit" / "result.json").read_text())["outcome"] == "error"


async def test_executor_strategy_never_consults(tmp_path: Path):
    ex = FakeEndpoint(
        "ex",
        [call("nope", {}), call("add", None, '{"a": 1', "bad JSON"), call("add", {"a": 2, "b": 3})]
        + [Message.assistant("Answer: 5")],
        EXEC_PRICE,
    )
    fr = FakeEndpoint("fr", [], FRONT_PRICE)
    task = make(ex, fr, escalation={"after_failures": 1, "at": ["plan", "final"]})
    result, events = await run(tmp_path, task, ex, fr, strategy="executor")
    assert result.outcome == "passed" and result.consults == 0 and fr.calls == []
    assert [f["reason"] for f in kinds(events, "step_failed")] == ["unknown_tool", "malformed_tool_call"]
    assert result.cost_usd["frontier"] == 0 and result.tokens["frontier"]["input"] == 0


async def test_frontier_strategy_plays_the_executor_role(tmp_path: Path):
    ex = FakeEndpoint("ex", [], EXEC_PRICE)
    fr = FakeEndpoint("fr", [call("add", {"a": 2, "b": 3}), Message.assistant("Answer: 5")], FRONT_PRICE)
    task = make(ex, fr, escalation={"after_failures": 1, "at": ["plan", "final"]})
    result, events = await run(tmp_path, task, ex, fr, strategy="frontier")
    assert result.outcome == "passed" and result.consults == 0 and ex.calls == []
    assert {(c["role"], c["endpoint"]) for c in kinds(events, "model_call")} == {("frontier", "fr")}
    assert result.cost_usd["executor"] == 0
    assert (
        result.cost_usd["total"]
        == result.cost_usd["frontier_only_estimate"]
        == round(2 * FRONT_PRICE.cost(USAGE), 10)
    )
    assert fr.calls[0]["tools"] and events[0]["strategy"] == "frontier"


async def test_plan_and_replan_consults_share_a_stable_prefix(tmp_path: Path):
    ex = FakeEndpoint("ex", [Message.assistant("Answer: 6"), Message.assistant("Answer: 5")], EXEC_PRICE)
    fr = FakeEndpoint(
        "fr", [Message.assistant("Add the numbers."), Message.assistant("2+3 is 5.")], FRONT_PRICE
    )
    task = make(ex, fr, escalation={"at": ["plan", "replan"], "advice_max_tokens": 300})
    result, events = await run(tmp_path, task, ex, fr)
    assert result.outcome == "passed" and result.consults == 2 and result.steps == 2
    assert [c["trigger"] for c in kinds(events, "consult")] == ["plan", "replan"]
    assert [c["passed"] for c in kinds(events, "check")] == [False, True]
    first, second = (c["messages"] for c in fr.calls)
    assert fr.calls[0]["max_tokens"] == 300 and fr.calls[0]["tools"] is None
    assert first[0].text == second[0].text  # the same system prompt
    head = first[1].text.split("Executor's work so far:")[0]
    assert head and second[1].text.startswith(head)  # goal and tools first, byte-identical
    # the advice reached the executor before its first step, and the rejection before its second
    assert "Add the numbers." in ex.calls[0]["messages"][-1].text
    assert "2+3 is 5." in ex.calls[1]["messages"][-1].text
    assert kinds(events, "consult")[0]["estimated_cost_usd"] > 0


async def test_max_consults_then_skipped(tmp_path: Path):
    # three different unknown tools: the same one three times would end the task (test_repeats.py)
    ex = FakeEndpoint("ex", [call(f"nope{i}", {}, cid=f"c{i}") for i in range(3)], EXEC_PRICE)
    ex.turns.append(Message.assistant("Answer: 5"))
    fr = FakeEndpoint("fr", [Message.assistant("Use add.")], FRONT_PRICE)
    task = make(ex, fr, escalation={"after_failures": 1, "max_consults": 1})
    result, events = await run(tmp_path, task, ex, fr)
    assert result.outcome == "passed" and result.consults == 1 and result.skipped_consults == 2
    assert [s["reason"] for s in kinds(events, "consult_skipped")] == ["max_consults"] * 2
    assert len(fr.calls) == 1


async def test_max_steps_and_max_wall_s(tmp_path: Path):
    ex = FakeEndpoint("ex", [call("add", {"a": i, "b": 1}, cid=f"c{i}") for i in range(10)], EXEC_PRICE)
    result, events = await run(tmp_path, make(ex, budget={"max_steps": 3}), ex)
    assert result.outcome == "budget_exceeded" and result.steps == 3 and len(ex.calls) == 3
    assert kinds(events, "budget_exceeded")[0]["limit"] == "max_steps"

    slow = FakeEndpoint("slow", [Message.assistant("Answer: 5")], EXEC_PRICE, delay_s=10)
    task = make(slow, name="slow", budget={"max_wall_s": 0.3})
    result, events = await run(tmp_path, task, slow)
    assert result.outcome == "budget_exceeded" and result.wall_s < 5
    assert kinds(events, "budget_exceeded")[-1]["limit"] == "max_wall_s"


def cropper(tmp_path: Path, answer: str) -> tuple[Path, FakeEndpoint]:
    """A red 64x48 input image, and an executor that crops it and then answers `answer`."""
    img = tmp_path / "in" / "photo.png"
    img.parent.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(img)
    turns = [call("crop", {"image": "img_0", "box": [0, 0, 32, 24]}), Message.assistant(f"Answer: {answer}")]
    return img, FakeEndpoint("ex", turns, EXEC_PRICE)


async def test_tool_images_follow_the_tool_messages_as_image_parts(tmp_path: Path):
    img, ex = cropper(tmp_path, "red")
    task = make(ex, tools=["crop"], inputs={"images": [str(img)]}, check={"type": "contains", "value": "red"})
    result, events = await run(tmp_path, task, ex)
    assert result.outcome == "passed", result.error
    first = ex.calls[0]["messages"]
    assert isinstance(first[1].images[0], ImagePart) and first[1].images[0].image_id == "img_0"
    second = ex.calls[1]["messages"]
    roles = [m.role for m in second]
    assert roles[-3:] == ["assistant", "tool", "user"]
    assert second[-1].images[0].image_id == "img_1" and second[-1].images[0].data
    assert kinds(events, "tool_result")[0]["images"] == ["img_1"]


async def test_a_text_only_endpoint_gets_the_image_lines_but_no_pixels(tmp_path: Path):
    """`vision: false`: the frontier (a vision model) still gets the pixels of the same conversation."""
    img, ex = cropper(tmp_path, "blue")
    ex.config = ex.config.model_copy(update={"vision": False})
    fr = FakeEndpoint("fr", [Message.assistant("Answer: red")], FRONT_PRICE)
    task = make(
        ex,
        fr,
        tools=["crop"],
        inputs={"images": [str(img)]},
        check={"type": "contains", "value": "red"},
        escalation={"after_failures": 1, "mode": "takeover", "takeover_steps": 1},
    )
    result, _ = await run(tmp_path, task, ex, fr)
    assert result.outcome == "passed", result.error
    for sent in (ex.calls[0]["messages"], ex.calls[1]["messages"]):
        assert not any(m.images for m in sent)
    first, second = ex.calls[0]["messages"], ex.calls[1]["messages"]
    assert "img_0: 64x48 px (input photo.png)" in first[1].text
    assert second[-1].role == "user" and second[-1].text.startswith("Images from the tools: img_1: ")
    seen = fr.calls[0]["messages"]
    assert [p.image_id for m in seen for p in m.images] == ["img_0", "img_1"]


async def test_a_slow_tool_is_cut_at_max_wall_s(tmp_path: Path):
    @tool
    async def wait(seconds: float) -> str:
        """Wait.

        Args:
            seconds: how long
        """
        await asyncio.sleep(seconds)
        return "done"

    ex = FakeEndpoint("ex", [call("wait", {"seconds": 30})], EXEC_PRICE)
    result, events = await run(tmp_path, make(ex, tools=[wait], budget={"max_wall_s": 0.3}), ex)
    assert result.outcome == "budget_exceeded" and "in tool wait" in result.error and result.wall_s < 5
    assert events[-2]["type"] == "budget_exceeded" and events[-2]["limit"] == "max_wall_s"


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_endpoints_merge_config_dir_then_beside_then_task(tmp_path: Path, monkeypatch):
    cfg = {"provider": "openai", "model": "from-config", "free": True}
    monkeypatch.setenv("ADVISOR_CONFIG_DIR", str(tmp_path / "cfg"))
    _write(tmp_path / "cfg" / "advisor.yaml", {"endpoints": {"a": cfg, "b": cfg, "c": cfg}})
    _write(
        tmp_path / "t" / "advisor.yaml",
        {"endpoints": {"b": {**cfg, "model": "beside"}, "c": {**cfg, "model": "beside"}}},
    )
    task_yaml = {
        "name": "merge",
        "goal": "g",
        "executor": {"endpoint": "a"},
        "frontier": {"endpoint": "c"},
        "endpoints": {"c": {**cfg, "model": "task"}},
    }
    task = load_task(_write(tmp_path / "t" / "task.yaml", task_yaml))
    assert {k: v.model for k, v in task.endpoints.items()} == {"a": "from-config", "b": "beside", "c": "task"}


def test_task_in_python_gets_the_same_validation(tmp_path: Path):
    ex = FakeEndpoint("ex", [], EXEC_PRICE)
    with pytest.raises(Exception, match="unknown tool 'hammer'"):
        make(ex, tools=["hammer"])
    task = make(ex, endpoints={"ex": EndpointConfig(provider="openai", model="m")})
    with pytest.raises(TaskError, match=r"endpoints\.ex\.price: endpoint has no price"):
        asyncio.run(Advisor(runs_dir=tmp_path, endpoints={"ex": ex}).run(task))
    # a goal and a function are all a task needs besides its executor
    task = Task(goal="g", tools=[add], executor={"endpoint": "ex"}, endpoints={"ex": ex.config})
    assert task.name == "task" and [t.name for t in task.tool_specs()] == ["add"]


async def test_takeover_hands_back_and_rejections_count_as_failures(tmp_path: Path):
    ex = FakeEndpoint(
        "ex",
        [Message.assistant("Answer: 4"), Message.assistant("Answer: 6"), Message.assistant("Answer: 5")],
        EXEC_PRICE,
    )
    fr = FakeEndpoint("fr", [call("add", {"a": 2, "b": 3})], FRONT_PRICE)
    task = make(ex, fr, escalation={"after_failures": 2, "mode": "takeover", "takeover_steps": 1})
    result, events = await run(tmp_path, task, ex, fr)
    assert result.outcome == "passed" and result.consults == 1 and result.steps == 4
    assert [(c["trigger"], c["mode"]) for c in kinds(events, "consult")] == [("failures", "takeover")]
    assert [c["purpose"] for c in kinds(events, "model_call")] == ["step", "step", "takeover", "step"]
    assert "takes over" in fr.calls[0]["messages"][-1].text and fr.calls[0]["tools"]
    last = ex.calls[-1]["messages"]
    assert [m.role for m in last[-3:]] == ["assistant", "tool", "user"] and "hands the task back" in last[
        -1
    ].text


async def test_restart_drops_the_failed_attempt_and_the_executor_continues_the_frontiers(tmp_path: Path):
    ex = FakeEndpoint("ex", [Message.assistant("Answer: 4"), Message.assistant("Answer: 5")], EXEC_PRICE)
    fr = FakeEndpoint("fr", [call("add", {"a": 2, "b": 3})], FRONT_PRICE)
    task = make(ex, fr, escalation={"after_failures": 1, "mode": "restart", "takeover_steps": 1})
    result, events = await run(tmp_path, task, ex, fr)
    assert result.outcome == "passed" and result.consults == 1 and result.steps == 3
    assert [(c["trigger"], c["mode"]) for c in kinds(events, "consult")] == [("failures", "restart")]
    assert [r["dropped_messages"] for r in kinds(events, "restart")] == [2]  # the answer and its rejection
    assert [c["purpose"] for c in kinds(events, "model_call")] == ["step", "takeover", "step"]
    opening = [m.role for m in ex.calls[0]["messages"]]
    assert [m.role for m in fr.calls[0]["messages"]] == opening and fr.calls[0]["tools"]
    # one clean attempt: the opening, the frontier's call and its result; no rejection, no hand-back note
    assert [m.role for m in ex.calls[-1]["messages"]] == [*opening, "assistant", "tool"]
    assert not any("Answer: 4" in m.text for m in ex.calls[-1]["messages"])
    assert kinds(events, "answer")[0]["answer"] == "4"  # the trace keeps what was dropped


def test_library_run_checks_key_variables_unless_the_endpoint_is_given(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("UNIT_TEST_KEY", raising=False)
    ex = FakeEndpoint("ex", [Message.assistant("Answer: 5")], EXEC_PRICE)
    cfg = ex.config.model_copy(update={"api_key_env": "UNIT_TEST_KEY"})
    task = make(ex, endpoints={"ex": cfg})
    with pytest.raises(TaskError, match="UNIT_TEST_KEY is not set"):
        asyncio.run(Advisor(runs_dir=tmp_path).run(task))
    out = io.StringIO()
    adv = Advisor(runs_dir=tmp_path, endpoints={"ex": ex}, console=Console(file=out, width=200))
    result = asyncio.run(adv.run(task))
    assert result.outcome == "passed"
    assert out.getvalue().startswith("unit: passed after 1 steps, 0 consults, $0.0000")


async def test_malformed_call_without_a_name_leaves_a_history_every_format_can_carry(tmp_path: Path):
    from advisor.engine.text.chat import render_chat

    from advisor.endpoints.openai import to_openai_messages

    raw = "<tool_call>\n<function=>\n</function>\n</tool_call>"
    ex = FakeEndpoint(
        "ex",
        [
            call("", None, raw, "missing function name"),
            call("add", {"a": 2, "b": 3}),
            Message.assistant("Answer: 5"),
        ],
        EXEC_PRICE,
    )
    result, events = await run(tmp_path, make(ex), ex)
    assert result.outcome == "passed"
    assert [f["reason"] for f in kinds(events, "step_failed")] == ["malformed_tool_call"]
    history = ex.calls[1]["messages"]  # what the executor saw after its malformed turn
    assert all(tc.name for m in history for tc in m.tool_calls)
    assert raw in history[-2].text and history[-2].role == "assistant"
    assert history[-1].role == "user" and "malformed tool call" in history[-1].text
    wire = to_openai_messages(history)
    assert raw in render_chat(wire, [add.openai_schema()])  # renders in the Step format too
    later = ex.calls[2]["messages"]
    ids = [tc.id for m in later for tc in m.tool_calls]
    assert ids == [m.tool_call_id for m in later if m.role == "tool"]  # every call has its result
