"""The OpenAI Responses API (`POST /v1/responses`) as a third client wire of the proxy, beside chat
completions and Messages: Codex CLI speaks only this, and it is the OpenAI Agents SDK's default.

The translation is the one `advisor serve` uses (`advisor.engine.serving.responses`): a Responses body
becomes a chat-completions body, which the chat wire parses into the neutral `ChatRequest`; the router
then sends it to either kind of upstream, decides and books it as for the other wires. The client's
`reasoning.effort` is taken and checked, and the role's own effort is sent, as on the other wires.

`previous_response_id`: the proxy keeps the conversations of its last stored responses in memory (LRU,
`sessions.responses_kept` in proxy.yaml) and puts the stored one before the new input; the earlier
`instructions` are not carried over, as OpenAI documents. The session of a request: the
`x-advisor-session` header, else `prompt_cache_key` (Codex sends its conversation id there), else the
hash of its system prompt and first user message, as on the other wires.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from advisor.endpoints.openai import openai_usage
from advisor.endpoints.stream import Delta, ReasoningDelta, TextDelta, ToolCallDelta
from advisor.engine.serving import responses as rs
from advisor.messages import ModelResponse
from advisor.proxy.wire import OPENAI, Events, OpenAIWire, Wire, WireRequest, _model, _sse


@dataclass
class ResponsesRequest(WireRequest):
    body: dict = field(default_factory=dict)
    conversation: list[dict] = field(default_factory=list)  # chat messages, instructions excluded


class ResponsesWire(Wire):
    """`POST /v1/responses`, with its store of recent responses for `previous_response_id`."""

    name = "responses"

    def __init__(self, kept: int = 1000):
        self.store = rs.ResponseStore(kept)

    def parse(self, body: Any) -> ResponsesRequest:
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        model = _model(body)
        chat, conversation = rs.to_chat(body, self.store.history(body))
        parsed = OPENAI.parse(chat)
        key = body.get("prompt_cache_key")
        return ResponsesRequest(
            parsed.chat,
            model,
            parsed.stream,
            session=key if isinstance(key, str) and key else None,
            body=body,
            conversation=conversation,
        )

    def keep(self, parsed: ResponsesRequest, final: dict) -> None:
        """Stores a finished response (unless `store: false`) for a later previous_response_id."""
        if parsed.body.get("store", True):
            self.store.put(final["id"], [*parsed.conversation, rs.stored_turn(final["output"])])

    def reply_to(self, parsed: WireRequest, resp: ModelResponse) -> dict:
        assert isinstance(parsed, ResponsesRequest)
        response = rs.response_object(parsed.body, rs.new_id("resp"), parsed.model, "in_progress")
        output = rs.output_items(OpenAIWire._message(resp))
        final = rs.finished(response, output, resp.finish_reason, _usage(resp))
        self.keep(parsed, final)
        return final

    def events_for(self, parsed: WireRequest) -> Events:
        assert isinstance(parsed, ResponsesRequest)
        return ResponsesEvents(self, parsed)

    def error(self, status: int, kind: str, message: str) -> dict:
        param = None
        if status == 400:
            head = message.removeprefix("advisor proxy: ").split(": ", 1)[0]
            param = head if head and " " not in head else None
        return {"error": {"message": message, "type": kind, "param": param, "code": kind}}

    def stream_error(self, kind: str, message: str) -> str:
        return _sse({"type": "error", "code": kind, "message": message, "param": None}, "error")


def _usage(resp: ModelResponse) -> dict | None:
    return rs.usage_of_chat(openai_usage(resp.usage))


def _events(events: list[dict]) -> list[str]:
    return [_sse(e, e["type"]) for e in events]


class ResponsesEvents(Events):
    """The upstream's deltas as a response's server-sent events (`advisor.engine.serving.responses`
    `ResponseStream`); a failure after the first byte is `response.failed`."""

    def __init__(self, wire: ResponsesWire, parsed: ResponsesRequest):
        self.wire, self.parsed = wire, parsed
        response = rs.response_object(parsed.body, rs.new_id("resp"), parsed.model, "in_progress")
        self.stream = rs.ResponseStream(response)

    def start(self) -> list[str]:
        return _events(self.stream.start())

    def delta(self, delta: Delta) -> list[str]:
        if isinstance(delta, TextDelta):
            return _events(self.stream.text(delta.text))
        if isinstance(delta, ReasoningDelta):
            return _events(self.stream.reasoning(delta.text))
        if isinstance(delta, ToolCallDelta):
            return _events(self.stream.call(delta.index, delta.id, delta.name, delta.arguments))
        return []  # pings and the like: nothing on this wire

    def end(self, resp: ModelResponse) -> list[str]:
        events, final = self.stream.end(resp.finish_reason, _usage(resp))
        self.wire.keep(self.parsed, final)
        return _events(events)

    def fail(self, kind: str, message: str) -> list[str]:
        return _events(self.stream.fail("server_error" if kind == "api_error" else kind, message))
