"""The same failing tool call made N times (budget.max_repeated_failures, default 3) ends the task as
`failed` with that reason, instead of running on to the step, budget or time limit."""

from pathlib import Path

from advisor.repeats import CallRepeats, call_key
from tests.advisor.test_loop_unit import EXEC_PRICE, FakeEndpoint, call, kinds, make, run


def test_call_repeats_counts_failures_and_refusals():
    r = CallRepeats(limit=3)
    k = call_key("read_file", {"path": "a.txt"})
    assert k == call_key("read_file", {"path": "a.txt"}) != call_key("read_file", {"path": "b.txt"})
    assert call_key("nope", {"x": 1}, known=False) == call_key("nope", {"y": 2}, known=False) == "nope"
    assert r.refusal(k) is None
    assert r.failed(k) == 1 and "already made and failed" in r.refusal(k)
    assert r.failed(k) == 2 and not r.exhausted(k)
    assert r.failed(k) == 3 and r.exhausted(k)
    ok = call_key("add", {"a": 1})
    r.succeeded(ok)
    assert "changed nothing" in r.refusal(ok)  # the same successful call again: looping
    r.succeeded(call_key("add", {"a": 2}))
    assert r.refusal(ok) is None


async def test_a_failing_call_made_three_times_ends_the_task_failed(tmp_path: Path):
    ex = FakeEndpoint("ex", [call("explode", {"x": 1})] * 3 + [call("add", {"a": 2, "b": 3})] * 5, EXEC_PRICE)
    result, events = await run(tmp_path, make(ex), ex)
    assert result.outcome == "failed" and result.steps == 3
    assert result.error == 'the same failing tool call was made 3 times: explode({"x": 1})'
    failed = kinds(events, "step_failed")
    assert [f["reason"] for f in failed] == ["tool_error", "repeated_call", "repeated_call"]
    (stuck,) = kinds(events, "stuck")
    assert stuck["name"] == "explode" and stuck["times"] == 3 and stuck["step"] == 3
    assert events[-1]["type"] == "task_end" and events[-1]["outcome"] == "failed"
    assert len(ex.turns) == 5  # no model call after the third


async def test_an_unknown_tool_is_the_same_failure_whatever_its_arguments(tmp_path: Path):
    turns = [call("read_file", {"path": p}) for p in ("a", "b", "c", "d")]
    ex = FakeEndpoint("ex", turns, EXEC_PRICE)
    result, events = await run(tmp_path, make(ex), ex)
    assert result.outcome == "failed" and result.steps == 3
    assert result.error == "the same failing tool call was made 3 times: read_file()"
    assert [f["reason"] for f in kinds(events, "step_failed")] == ["unknown_tool"] * 3


async def test_the_limit_is_set_per_task_and_other_calls_in_between_do_not_reset_it(tmp_path: Path):
    turns = [call("explode", {"x": 1}), call("add", {"a": 2, "b": 3}), call("explode", {"x": 1})] * 2
    ex = FakeEndpoint("ex", turns + [call("add", {"a": 1, "b": 1})], EXEC_PRICE)
    task = make(ex, budget={"max_usd": 1.0, "max_steps": 10, "max_wall_s": 30, "max_repeated_failures": 4})
    result, _ = await run(tmp_path, task, ex)
    assert result.outcome == "failed" and result.steps == 6
    assert "made 4 times: explode" in result.error


async def test_a_call_to_a_tool_not_offered_counts_even_when_the_parser_rejects_it(tmp_path: Path):
    # the embedded parser turns a call to a function outside the schemas into a malformed call
    bad = [
        call("read_file", None, raw=f"<function=read_file>{i}</function>", error="call to unknown function 'read_file'")
        for i in range(4)
    ]
    ex = FakeEndpoint("ex", bad, EXEC_PRICE)
    result, events = await run(tmp_path, make(ex), ex)
    assert result.outcome == "failed" and result.steps == 3
    assert result.error == "the same failing tool call was made 3 times: read_file()"
    assert [f["reason"] for f in kinds(events, "step_failed")] == ["malformed_tool_call"] * 3


async def test_broken_calls_of_an_offered_tool_count_by_their_text(tmp_path: Path):
    turns = [call("add", None, raw=raw, error="bad JSON") for raw in ('{"a": 1', '{"a": 2', '{"a": 1', '{"a": 1')]
    ex = FakeEndpoint("ex", turns + [call("add", {"a": 2, "b": 3})], EXEC_PRICE)
    result, _ = await run(tmp_path, make(ex), ex)
    assert result.outcome == "failed" and result.steps == 4  # the third '{"a": 1' ends it
    assert "made 3 times: add(" in result.error
