"""The two wire formats a harness may speak to the proxy, OpenAI chat completions and Anthropic Messages.

Each `Wire` turns a request body into a `ChatRequest` (through the endpoints' own parsers, the inverse
of what they send), and a `ModelResponse` back into a reply, a server-sent-event stream, or an error, in
its format. Which upstream answered does not matter here: both come back as a neutral `ModelResponse`.

Streams are rendered from the upstream's whole reply (the proxy decides and records a call when it is
complete), so a stream's events carry the same text, tool calls, usage and stop reason a non-streamed
reply would.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from advisor.endpoints.anthropic import (
    FINISH_TO_STOP,
    anthropic_usage,
    assistant_blocks,
    from_anthropic_messages,
)
from advisor.endpoints.base import ChatRequest, ToolChoice
from advisor.endpoints.openai import from_openai_messages, openai_usage, to_openai_messages
from advisor.messages import ModelResponse
from tools.spec import ToolSpec


class _AnyArgs(BaseModel):
    model_config = ConfigDict(extra="allow")


def _harness_runs_it(**_: Any) -> None:
    raise RuntimeError("a proxied tool is run by the harness, never by the proxy")


def passthrough_tool(name: Any, description: Any, parameters: Any, where: str) -> ToolSpec:
    """A tool the harness defined: the proxy forwards its schema and never runs it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: a tool needs a name")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise ValueError(f"{where}: the parameters schema must be an object")
    return ToolSpec(name, str(description or ""), parameters, _harness_runs_it, _AnyArgs)


@dataclass
class WireRequest:
    chat: ChatRequest
    model: str
    stream: bool
    include_usage: bool = False  # OpenAI: stream_options.include_usage


def _max_tokens(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field}: must be a positive integer")
    return value


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("model: required (a model name this proxy serves)")
    return model


def _sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class Wire:
    name: str

    def parse(self, body: Any) -> WireRequest:
        raise NotImplementedError

    def reply(self, resp: ModelResponse, model: str) -> dict:
        raise NotImplementedError

    def stream(self, resp: ModelResponse, model: str, include_usage: bool) -> Iterator[str]:
        raise NotImplementedError

    def error(self, status: int, kind: str, message: str) -> dict:
        raise NotImplementedError

    def stream_error(self, kind: str, message: str) -> str:
        raise NotImplementedError


class OpenAIWire(Wire):
    """`POST /v1/chat/completions`."""

    name = "openai"

    def parse(self, body: Any) -> WireRequest:
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        model = _model(body)
        messages = from_openai_messages(body.get("messages"))
        tools = []
        for i, t in enumerate(body.get("tools") or []):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or t.get("type", "function") != "function":
                raise ValueError(f"tools[{i}]: must be {{type: function, function: {{name, parameters}}}}")
            tools.append(
                passthrough_tool(fn.get("name"), fn.get("description"), fn.get("parameters"), f"tools[{i}]")
            )
        choice = body.get("tool_choice")
        tool_choice: ToolChoice | None
        if choice in (None, "auto", "none", "required"):
            tool_choice = choice
        elif isinstance(choice, dict):
            tool_choice = "required"  # a named function: the neutral request can only insist on a call
        else:
            raise ValueError(f"tool_choice: unsupported value {choice!r}")
        cap = _max_tokens(body.get("max_completion_tokens"), "max_completion_tokens") or _max_tokens(
            body.get("max_tokens"), "max_tokens"
        )
        stream = bool(body.get("stream"))
        include = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        return WireRequest(
            ChatRequest(messages, tools or None, tool_choice, None, cap), model, stream, include
        )

    @staticmethod
    def _message(resp: ModelResponse) -> dict:
        message = to_openai_messages([resp.message])[0]
        if resp.message.reasoning:
            message["reasoning_content"] = resp.message.reasoning
        return message

    @staticmethod
    def _finish(resp: ModelResponse) -> str:
        return resp.finish_reason or ("tool_calls" if resp.message.tool_calls else "stop")

    def reply(self, resp: ModelResponse, model: str) -> dict:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": self._message(resp), "finish_reason": self._finish(resp)}],
            "usage": openai_usage(resp.usage),
        }

    def stream(self, resp: ModelResponse, model: str, include_usage: bool) -> Iterator[str]:
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        def chunk(delta: dict, finish: str | None = None) -> str:
            return _sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        message = self._message(resp)
        yield chunk({"role": "assistant", "content": ""})
        if message.get("reasoning_content"):
            yield chunk({"reasoning_content": message["reasoning_content"]})
        if message.get("content"):
            yield chunk({"content": message["content"]})
        for i, call in enumerate(message.get("tool_calls") or []):
            fn = call["function"]
            head = {
                "index": i,
                "id": call["id"],
                "type": "function",
                "function": {"name": fn["name"], "arguments": ""},
            }
            yield chunk({"tool_calls": [head]})
            yield chunk({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]})
        yield chunk({}, self._finish(resp))
        if include_usage:
            yield _sse({**base, "choices": [], "usage": openai_usage(resp.usage)})
        yield "data: [DONE]\n\n"

    def error(self, status: int, kind: str, message: str) -> dict:
        return {"error": {"message": message, "type": kind, "code": kind, "param": None}}

    def stream_error(self, kind: str, message: str) -> str:
        return _sse(self.error(0, kind, message))


_ANTHROPIC_CHOICE: dict[str, ToolChoice] = {
    "auto": "auto",
    "any": "required",
    "tool": "required",
    "none": "none",
}


class AnthropicWire(Wire):
    """`POST /v1/messages`."""

    name = "anthropic"

    def parse(self, body: Any) -> WireRequest:
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        model = _model(body)
        messages = from_anthropic_messages(body.get("system"), body.get("messages"))
        tools = []
        for i, t in enumerate(body.get("tools") or []):
            if not isinstance(t, dict):
                raise ValueError(f"tools[{i}]: must be an object {{name, description, input_schema}}")
            if t.get("type") not in (None, "custom"):
                continue  # server tools (web search, ...) belong to Anthropic's API, not a proxied model
            tools.append(
                passthrough_tool(t.get("name"), t.get("description"), t.get("input_schema"), f"tools[{i}]")
            )
        choice = body.get("tool_choice")
        tool_choice: ToolChoice | None = None
        if choice is not None:
            kind = choice.get("type") if isinstance(choice, dict) else None
            if kind not in _ANTHROPIC_CHOICE:
                raise ValueError(f"tool_choice: unsupported value {choice!r}")
            tool_choice = _ANTHROPIC_CHOICE[kind]
        cap = _max_tokens(body.get("max_tokens"), "max_tokens")
        return WireRequest(
            ChatRequest(messages, tools or None, tool_choice, None, cap), model, bool(body.get("stream"))
        )

    @staticmethod
    def _stop(resp: ModelResponse) -> str:
        finish = resp.finish_reason or ("tool_calls" if resp.message.tool_calls else "stop")
        return FINISH_TO_STOP.get(finish, finish)

    @staticmethod
    def _content(resp: ModelResponse) -> list[dict]:
        # the upstream's thinking stays out: its signature (if any) is the upstream endpoint's to replay
        return assistant_blocks(resp.message) or [{"type": "text", "text": ""}]

    def reply(self, resp: ModelResponse, model: str) -> dict:
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": self._content(resp),
            "stop_reason": self._stop(resp),
            "stop_sequence": None,
            "usage": anthropic_usage(resp.usage),
        }

    def stream(self, resp: ModelResponse, model: str, include_usage: bool) -> Iterator[str]:
        usage = anthropic_usage(resp.usage)
        start = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 0},
        }
        yield _sse({"type": "message_start", "message": start}, "message_start")
        for i, block in enumerate(self._content(resp)):
            if block["type"] == "text":
                opening = {"type": "text", "text": ""}
                delta = {"type": "text_delta", "text": block["text"]}
            else:
                opening = {**block, "input": {}}
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            yield _sse(
                {"type": "content_block_start", "index": i, "content_block": opening}, "content_block_start"
            )
            yield _sse({"type": "content_block_delta", "index": i, "delta": delta}, "content_block_delta")
            yield _sse({"type": "content_block_stop", "index": i}, "content_block_stop")
        yield _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": self._stop(resp), "stop_sequence": None},
                "usage": usage,
            },
            "message_delta",
        )
        yield _sse({"type": "message_stop"}, "message_stop")

    def error(self, status: int, kind: str, message: str) -> dict:
        return {"type": "error", "error": {"type": kind, "message": message}}

    def stream_error(self, kind: str, message: str) -> str:
        return _sse(self.error(0, kind, message), "error")


OPENAI = OpenAIWire()
ANTHROPIC = AnthropicWire()
