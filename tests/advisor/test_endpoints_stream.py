"""`Endpoint.stream` against a real scripted server, for both HTTP providers: the deltas as they come,
ending in the same `ModelResponse` `complete` gives; retries before the first delta only; a stream
cut off after it raises with the usage of what was streamed; a consumer that stops closes the upstream."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import anthropic
import pytest
from advisor.tools.spec import ToolSpec

from advisor.endpoints import EndpointError, make_endpoint
from advisor.endpoints.stream import ReasoningDelta, StreamEnd, TextDelta, ToolCallDelta
from advisor.messages import Message
from advisor.proxy.wire import passthrough_tool
from advisor.testing import HTTPError, Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage

USAGE = ScriptedUsage(200, 40, cached_tokens=50)


def _reply(**fields) -> Reply:
    calls = [
        ScriptedToolCall("read", {"path": "a.py"}, id="t1"),
        ScriptedToolCall("read", {"path": "b.py"}, id="t2"),
    ]
    return Reply(text="Reading both.", reasoning="two files", tool_calls=calls, usage=USAGE, **fields)


def _tool() -> ToolSpec:
    schema = {"type": "object", "properties": {"path": {"type": "string"}}}
    return passthrough_tool("read", "read a file", schema, "tools[0]")


async def _no_sleep(_s: float) -> None:
    return None


def _endpoint(server: ScriptedServer, kind: str, **fields):
    return make_endpoint(
        "flash", server.endpoint_config("flash", kind, **fields), backoff_s=0.0, sleep=_no_sleep
    )


async def _drain(ep, request) -> list:
    return [d async for d in ep.stream(request)]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_stream_yields_deltas_then_the_response_complete_gives(kind):
    messages = [Message.user("read a.py and b.py")]
    with ScriptedServer({"flash": [_reply(), _reply()]}) as server:

        async def run():
            ep = _endpoint(server, kind)
            try:
                whole = await ep.complete(messages, tools=[_tool()])
                deltas = await _drain(ep, [*messages])
                return whole, deltas
            finally:
                await ep.aclose()

        whole, deltas = asyncio.run(run())
        sent = server.requests_for("flash")[1].body
    assert sent["stream"] is True
    *parts, end = deltas
    assert isinstance(end, StreamEnd)
    assert "".join(d.text for d in parts if isinstance(d, TextDelta)) == "Reading both."
    assert "".join(d.text for d in parts if isinstance(d, ReasoningDelta)) == "two files"
    calls = [d for d in parts if isinstance(d, ToolCallDelta)]
    assert [(d.index, d.id, d.name) for d in calls if d.id] == [(0, "t1", "read"), (1, "t2", "read")]
    for i, path in enumerate(["a.py", "b.py"]):
        assert "".join(d.arguments for d in calls if d.index == i) == f'{{"path": "{path}"}}'
    assert len([d for d in parts if isinstance(d, TextDelta)]) == 2  # split as it was sent, not joined
    got = end.response
    assert got.message.text == whole.message.text and got.message.reasoning == whole.message.reasoning
    assert [(c.id, c.arguments) for c in got.message.tool_calls] == [
        (c.id, c.arguments) for c in whole.message.tool_calls
    ]
    assert got.usage == whole.usage and not got.usage.estimated
    assert got.finish_reason == whole.finish_reason == "tool_calls"
    assert [a.ok for a in got.attempts] == [True]


def test_anthropic_stream_keeps_the_signed_thinking_for_replay():
    with ScriptedServer({"flash": [_reply(), "done"]}) as server:

        async def run():
            ep = _endpoint(server, "anthropic")
            try:
                deltas = await _drain(ep, [Message.user("go")])
                reply = deltas[-1].response.message
                follow = [Message.user("go"), reply] + [
                    Message("tool", [], tool_call_id=c.id, name=c.name) for c in reply.tool_calls
                ]
                await ep.complete(follow, tools=[_tool()], effort="low")
            finally:
                await ep.aclose()

        asyncio.run(run())
        replayed = server.requests_for("flash")[1].body["messages"][1]["content"][0]
    assert replayed["type"] == "thinking" and replayed["signature"].startswith("sig-")
    assert replayed["thinking"] == "two files"


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_failures_before_the_first_delta_are_retried(kind):
    with ScriptedServer({"flash": [HTTPError(429, retry_after=0), HTTPError(503), "ok"]}) as server:
        deltas = asyncio.run(_drain(_endpoint(server, kind), [Message.user("x")]))
    assert deltas[-1].response.message.text == "ok"
    assert [a.ok for a in deltas[-1].response.attempts] == [False, False, True]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_cut_after_the_first_delta_raises_with_the_streamed_usage_and_no_retry(kind):
    with ScriptedServer({"flash": [Reply(text="abcdefgh", cut_after=1), "never sent"]}) as server:
        got: list = []

        async def run():
            ep = _endpoint(server, kind)
            try:
                async for d in ep.stream([Message.user("x")]):
                    got.append(d)
            finally:
                await ep.aclose()

        with pytest.raises(EndpointError, match="stream broke off after its first delta") as err:
            asyncio.run(run())
        assert len(server.requests_for("flash")) == 1
    assert got == [TextDelta("abcd")]
    last = err.value.attempts[-1]
    assert not last.ok and last.usage is not None and last.usage.output > 0
    if kind == "anthropic":  # message_start already told the input tokens
        assert last.usage.input == 100 and not last.usage.estimated
    else:
        assert last.usage.estimated


def test_complete_over_a_stream_retries_a_cut_stream():
    # nothing of a complete() call has left it, so a stream cut off is tried again
    with ScriptedServer({"flash": [Reply(text="abcdefgh", cut_after=1), Reply(text="whole")]}) as server:
        ep = make_endpoint(
            "flash",
            server.endpoint_config("flash", extra_body={"stream": True}),
            backoff_s=0.0,
            sleep=_no_sleep,
        )
        resp = asyncio.run(ep.complete([Message.user("x")]))
    assert resp.message.text == "whole" and [a.ok for a in resp.attempts] == [False, True]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_closing_the_stream_closes_the_upstream_request(kind):
    never = threading.Event()
    with ScriptedServer({"flash": [Reply(text="x" * 100, hold=never, hold_s=20)]}) as server:
        attempts: list = []

        async def run():
            ep = _endpoint(server, kind)
            try:
                async with contextlib.aclosing(
                    ep.stream([Message.user("x")], on_attempt=attempts.append)
                ) as s:
                    async for _ in s:
                        break
            finally:
                await ep.aclose()

        asyncio.run(run())
        (rec,) = server.requests_for("flash")
        deadline = time.monotonic() + 10
        while rec.stream_outcome is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rec.stream_outcome == "client left"
    assert [a.error for a in attempts] == ["cancelled mid-stream"]


def test_the_scripted_anthropic_stream_is_what_the_anthropic_sdk_reads():
    with ScriptedServer({"flash": [_reply()]}) as server:
        client = anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="k", max_retries=0)
        with client.messages.stream(
            model="flash", max_tokens=50, messages=[{"role": "user", "content": "x"}]
        ) as s:
            final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert final.content[0].signature.startswith("sig-") and final.content[2].input == {"path": "a.py"}
    assert (final.usage.input_tokens, final.usage.output_tokens, final.stop_reason) == (150, 40, "tool_use")
