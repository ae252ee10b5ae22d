"""The Anthropic Messages wire format of a ScriptedServer: `POST /v1/messages`, a reply as a `message`
with thinking / text / tool_use blocks, `stop_reason` and `input_tokens`-style usage, an error as
Anthropic's error JSON; with `stream: true`, the Messages streaming events (the server paces them)."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from advisor.testing.script import HTTPError, Reply, StreamEvent, WireFormat

PATH = "/v1/messages"

# OpenAI finish reasons (what a Reply scripts) -> Anthropic stop reasons
STOP_REASONS = {"tool_calls": "tool_use", "stop": "end_turn", "length": "max_tokens"}


def error(err: HTTPError) -> JSONResponse:
    kind = {429: "rate_limit_error", 401: "authentication_error", 529: "overloaded_error"}.get(
        err.status, "api_error" if err.status >= 500 else "invalid_request_error"
    )
    payload = {
        "type": "error",
        "error": {"type": kind, "message": err.message or f"scripted HTTP {err.status}"},
    }
    return JSONResponse(payload, status_code=err.status, headers=err.headers)


def content(turn: Reply, n: int) -> list[dict]:
    """The reply's content blocks (tool_use ids `toolu_<n>_<i>` unless scripted). A str of arguments is
    parsed when it is valid JSON, else sent verbatim: the client must reject a non-object input."""
    blocks: list[dict] = []
    if turn.reasoning is not None:
        blocks.append({"type": "thinking", "thinking": turn.reasoning, "signature": f"sig-{n}"})
    if turn.text:
        blocks.append({"type": "text", "text": turn.text})
    for i, tc in enumerate(turn.tool_calls):
        args: Any = tc.arguments
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        blocks.append({"type": "tool_use", "id": tc.id or f"toolu_{n}_{i}", "name": tc.name, "input": args})
    return blocks


def reply(turn: Reply, body: dict, n: int) -> JSONResponse:
    finish = turn.finish
    payload = {
        "id": f"msg_{n}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": content(turn, n),
        "stop_reason": STOP_REASONS.get(finish, finish),
        "stop_sequence": None,
    }
    if turn.usage is not None:
        payload["usage"] = turn.usage.anthropic()
    return JSONResponse(payload)


def _halves(text: str) -> list[str]:
    mid = len(text) // 2
    return [x for x in (text[:mid], text[mid:]) if x]


def _event(data: dict, delta: bool = False) -> StreamEvent:
    return StreamEvent(f"event: {data['type']}\ndata: {json.dumps(data)}\n\n", delta)


def stream(turn: Reply, body: dict, n: int) -> list[StreamEvent]:
    """A reply as Messages streaming events, as Anthropic sends them: message_start (input usage, one
    output token), a ping, per block its start, deltas (text, thinking and tool input split in two; a
    thinking block's signature last) and stop, message_delta (stop reason, output tokens), message_stop."""
    finish = turn.finish
    start = {
        "id": f"msg_{n}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    if turn.usage is not None:
        start["usage"] = {**turn.usage.anthropic(), "output_tokens": 1}
    events = [_event({"type": "message_start", "message": start}), _event({"type": "ping"})]
    for i, block in enumerate(content(turn, n)):
        kind = block["type"]
        if kind == "tool_use":
            opening = {**block, "input": {}}
            args = block["input"] if isinstance(block["input"], str) else json.dumps(block["input"])
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in _halves(args)]
        elif kind == "thinking":
            opening = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": p} for p in _halves(block["thinking"])]
        else:
            opening = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in _halves(block["text"])]
        events.append(
            _event({"type": "content_block_start", "index": i, "content_block": opening}, kind == "tool_use")
        )
        events += [_event({"type": "content_block_delta", "index": i, "delta": d}, True) for d in deltas]
        if kind == "thinking":
            sig = {"type": "signature_delta", "signature": block["signature"]}
            events.append(_event({"type": "content_block_delta", "index": i, "delta": sig}))
        events.append(_event({"type": "content_block_stop", "index": i}))
    end: dict = {
        "type": "message_delta",
        "delta": {"stop_reason": STOP_REASONS.get(finish, finish), "stop_sequence": None},
    }
    if turn.usage is not None:
        end["usage"] = {"output_tokens": turn.usage.completion_tokens}
    return [*events, _event(end), _event({"type": "message_stop"})]


ANTHROPIC = WireFormat(path=PATH, error=error, reply=reply, stream=stream)
