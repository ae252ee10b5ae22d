"""The Responses API translation both servers use (`advisor.engine.serving.responses`): input items to
chat messages, the LRU store of previous responses, the event stream's order."""

from __future__ import annotations

import pytest
from advisor.engine.serving.responses import (
    ResponsesError,
    ResponseStore,
    ResponseStream,
    response_object,
    stored_turn,
    to_chat,
)


def test_items_become_one_assistant_turn_with_its_reasoning_and_tool_results():
    history = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
    ]
    kept = [dict(m) for m in history]
    body = {
        "model": "m",
        "instructions": "Be brief.",
        "input": [
            {"type": "function_call_output", "call_id": "a", "output": "1"},
            {"type": "reasoning", "id": "rs", "summary": [{"type": "summary_text", "text": "plan"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Next."}]},
            {"type": "function_call", "call_id": "b", "name": "g", "arguments": '{"x": 1}'},
            {"type": "function_call_output", "call_id": "b", "output": [{"type": "input_text", "text": "2"}]},
        ],
        "max_output_tokens": 9,
        "reasoning": {"effort": "minimal"},
    }
    chat, conversation = to_chat(body, history)
    assert history == kept  # the stored conversation is not touched
    assert [m["role"] for m in chat["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
    ]
    turn = chat["messages"][4]
    assert turn["content"] == "Next." and turn["reasoning_content"] == "plan"
    assert turn["tool_calls"][0]["function"] == {"name": "g", "arguments": '{"x": 1}'}
    assert chat["max_tokens"] == 9 and chat["reasoning_effort"] == "low"
    assert conversation == chat["messages"][1:]  # the instructions are not stored


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": [{"type": "function_call_output", "call_id": "zz", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": "x", "text": {"format": {"type": "json_object"}}}, "text.format.type"),
        ({"input": "x", "reasoning": {"effort": "max"}}, "reasoning.effort"),
        ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"input": "x", "background": True}, "background"),
    ],
)
def test_bad_input_names_its_field(body, param):
    with pytest.raises(ResponsesError) as e:
        to_chat({"model": "m", **body}, [])
    assert e.value.param == param and str(e.value).startswith(f"{param}: ")


def test_the_store_keeps_the_last_n_least_recently_used_out():
    store = ResponseStore(2)
    store.put("a", [{"role": "user", "content": "1"}])
    store.put("b", [])
    assert store.get("a") is not None  # a is now the most recent
    store.put("c", [])
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    with pytest.raises(ResponsesError, match="previous_response_id: no response 'b'"):
        store.history({"previous_response_id": "b"})


def test_the_event_stream_numbers_events_and_closes_each_item_before_the_next():
    stream = ResponseStream(response_object({"model": "m"}, "resp_1", "m", "in_progress"))
    events = stream.start() + stream.reasoning("r") + stream.text("Hel") + stream.text("lo")
    events += stream.call(0, "c1", "f", '{"a"') + stream.call(0, None, None, ": 1}")
    closing, final = stream.end("tool_calls", None)
    events += closing
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds.index("response.reasoning_summary_part.done") < kinds.index("response.output_text.delta")
    assert kinds.index("response.output_text.done") < kinds.index("response.function_call_arguments.delta")
    assert kinds[-1] == "response.completed"
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][2]["arguments"] == '{"a": 1}'
    turn = stored_turn(final["output"])
    assert turn == {
        "role": "assistant",
        "content": "Hello",
        "reasoning_content": "r",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
    }
    cut, _ = ResponseStream(response_object({}, "resp_2", "m", "in_progress")).end("length", None)
    assert cut[-1]["type"] == "response.incomplete"
    assert cut[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
