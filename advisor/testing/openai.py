"""The OpenAI chat-completions wire format of a ScriptedServer: `POST /v1/chat/completions`, a reply as
a `chat.completion` (or, with `stream: true`, as server-sent `chat.completion.chunk` events: text and
tool-call arguments split over two chunks each, usage last when `stream_options.include_usage`; the
server paces them), an error as OpenAI's error JSON."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.responses import JSONResponse, Response

from advisor.testing.script import HTTPError, Reply, ScriptedUsage, StreamEvent, WireFormat

PATH = "/v1/chat/completions"


def error(err: HTTPError) -> JSONResponse:
    kind = {429: "rate_limit_error", 401: "authentication_error"}.get(
        err.status, "api_error" if err.status >= 500 else "invalid_request_error"
    )
    payload = {
        "error": {
            "message": err.message or f"scripted HTTP {err.status}",
            "type": kind,
            "code": err.status,
        }
    }
    return JSONResponse(payload, status_code=err.status, headers=err.headers)


def message(turn: Reply, n: int) -> dict[str, Any]:
    """The reply's assistant message (tool-call ids `call_<n>_<i>` unless scripted)."""
    msg: dict[str, Any] = {"role": "assistant", "content": turn.text}
    if turn.reasoning is not None:
        msg["reasoning_content"] = turn.reasoning
    if turn.tool_calls:
        msg["tool_calls"] = [
            {
                "id": tc.id or f"call_{n}_{i}",
                "type": "function",
                "function": {
                    "name": tc.name,
                    "arguments": tc.arguments if isinstance(tc.arguments, str) else json.dumps(tc.arguments),
                },
            }
            for i, tc in enumerate(turn.tool_calls)
        ]
    return msg


def reply(turn: Reply, body: dict, n: int) -> Response:
    payload = {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": message(turn, n), "finish_reason": turn.finish}],
    }
    if turn.usage is not None:
        payload["usage"] = turn.usage.openai()
    return JSONResponse(payload)


def _halves(text: str) -> list[str]:
    mid = len(text) // 2
    return [x for x in (text[:mid], text[mid:]) if x]


def stream(turn: Reply, body: dict, n: int) -> list[StreamEvent]:
    """A reply as OpenAI stream chunks, each text and tool-call argument split across two chunks, usage
    last when `stream_options.include_usage`, then `[DONE]`."""
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    chunks = stream_chunks(
        f"chatcmpl-{n}", body.get("model"), message(turn, n), turn.finish, turn.usage, include_usage
    )
    events = [StreamEvent(f"data: {json.dumps(c)}\n\n", _is_delta(c)) for c in chunks]
    return events + [StreamEvent("data: [DONE]\n\n")]


def _is_delta(chunk: dict) -> bool:
    delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))


def stream_chunks(
    cid: str, model: str | None, message: dict, finish: str, usage: ScriptedUsage | None, include_usage: bool
) -> list[dict]:
    """A reply as OpenAI stream chunks, each text and tool-call argument split across two chunks."""
    deltas: list[dict] = [{"role": "assistant"}]
    deltas += [{"reasoning_content": part} for part in _halves(message.get("reasoning_content") or "")]
    deltas += [{"content": part} for part in _halves(message.get("content") or "")]
    for i, call in enumerate(message.get("tool_calls", [])):
        fn = call["function"]
        first, *rest = _halves(fn["arguments"]) or [""]
        deltas.append(
            {
                "tool_calls": [
                    {
                        "index": i,
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": fn["name"], "arguments": first},
                    }
                ]
            }
        )
        deltas += [{"tool_calls": [{"index": i, "function": {"arguments": part}}]} for part in rest]
    base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if include_usage and usage is not None:
        chunks.append({**base, "choices": [], "usage": usage.openai()})
    return chunks


OPENAI = WireFormat(path=PATH, error=error, reply=reply, stream=stream)
