"""The Anthropic Messages wire format of a ScriptedServer: `POST /v1/messages`, a reply as a `message`
with thinking / text / tool_use blocks, `stop_reason` and `input_tokens`-style usage, an error as
Anthropic's error JSON. Replies are not streamed: a `stream: true` request is refused before it
consumes a turn."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from advisor.testing.script import HTTPError, Reply, WireFormat

PATH = "/v1/messages"

# OpenAI finish reasons (what a Reply scripts) -> Anthropic stop reasons
STOP_REASONS = {"tool_calls": "tool_use", "stop": "end_turn", "length": "max_tokens"}


def refuse(body: dict) -> HTTPError | None:
    if body.get("stream"):
        return HTTPError(400, "ScriptedServer does not stream Anthropic replies")
    return None


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


ANTHROPIC = WireFormat(path=PATH, error=error, reply=reply, refuse=refuse)
