"""The two wire formats a harness may speak to the proxy, OpenAI chat completions and Anthropic Messages.

Each `Wire` turns a request body into a `ChatRequest` (through the endpoints' own parsers, the inverse
of what they send), and a `ModelResponse` back into a reply, a server-sent-event stream, or an error, in
its format. Which upstream answered does not matter here: both come back as a neutral `ModelResponse`.

A streamed reply is translated delta by delta as the upstream sends it (`Wire.events`: one translator
per wire, whichever upstream). An upstream that cannot stream answers `Endpoint.stream` with its
complete reply as deltas (`advisor.endpoints.stream.deltas_of`), which go through the same translator.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from advisor import fastjson
from advisor.consult import ADVISOR_TOOL, advisor_tool_spec
from advisor.endpoints.anthropic import (
    FINISH_TO_STOP,
    anthropic_usage,
    assistant_blocks,
    from_anthropic_messages,
)
from advisor.endpoints.base import ChatRequest, ToolChoice
from advisor.endpoints.openai import from_openai_messages, openai_usage, to_openai_messages
from advisor.endpoints.stream import Delta, ReasoningDelta, TextDelta, ToolCallDelta
from advisor.messages import ModelResponse, Usage
from advisor.proxy.advisor_tool import (
    ANTHROPIC_TYPE,
    OPENAI_TYPES,
    AdvisedResponse,
    AdvisorCall,
    AdvisorResult,
    AdvisorToolSpec,
    IterationEnd,
    Ping,
    parse_anthropic_tool,
    parse_openai_tool,
    unfold_server_blocks,
)
from advisor.tools.spec import ToolSpec


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
    advisor: AdvisorToolSpec | None = (
        None  # the request offered the advisor tool (advisor.proxy.advisor_tool)
    )


def _max_tokens(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field}: must be a positive integer")
    return value


def _number(body: dict, field: str, low: float, high: float) -> float | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{field}: must be a number from {low:g} to {high:g} (got {value!r})")
    return value


def _integer(body: dict, field: str, low: int | None = None) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        floor = f" of at least {low}" if low is not None else ""
        raise ValueError(f"{field}: must be an integer{floor} (got {value!r})")
    return value


def _stops(value: Any, field: str) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
        raise ValueError(f"{field}: must be a string or a list of non-empty strings")
    return stops or None


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("model: required (a model name this proxy serves)")
    return model


def _rid() -> str:
    """24 random hex digits for a reply's id (as uuid4().hex[:24], without building a UUID)."""
    return os.urandom(12).hex()


def _sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {fastjson.dumps(data).decode()}\n\n"


class Wire:
    name: str

    def parse(self, body: Any) -> WireRequest:
        raise NotImplementedError

    def reply(self, resp: ModelResponse, model: str) -> dict:
        raise NotImplementedError

    def events(self, model: str, include_usage: bool) -> Events:
        """A translator from upstream deltas to this wire's server-sent events, for one reply."""
        raise NotImplementedError

    def error(self, status: int, kind: str, message: str) -> dict:
        raise NotImplementedError

    def stream_error(self, kind: str, message: str) -> str:
        raise NotImplementedError


class Events:
    """One reply's stream in a wire format: `start()` before the first delta, `delta()` per upstream
    delta, then `end(response)` (finish reason and usage) or `fail(kind, message)` (the stream breaks
    off with an error event). Each returns the server-sent events to send, in order."""

    def start(self) -> list[str]:
        raise NotImplementedError

    def delta(self, delta: Delta) -> list[str]:
        raise NotImplementedError

    def end(self, resp: ModelResponse) -> list[str]:
        raise NotImplementedError

    def fail(self, kind: str, message: str) -> list[str]:
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
        advisor = None
        for i, t in enumerate(body.get("tools") or []):
            if isinstance(t, dict) and t.get("type") in OPENAI_TYPES:
                advisor = parse_openai_tool(t, f"tools[{i}]")
                tools.append(advisor_tool_spec())
                continue
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
        n = body.get("n")
        if n is not None and n != 1:
            raise ValueError(
                f"n: the advisor proxy routes one answer per request, so n must be 1 (got {n!r})"
            )
        parallel = body.get("parallel_tool_calls")
        if parallel is not None and not isinstance(parallel, bool):
            raise ValueError(f"parallel_tool_calls: must be true or false (got {parallel!r})")
        chat = ChatRequest(
            messages,
            tools or None,
            tool_choice,
            None,
            cap,
            temperature=_number(body, "temperature", 0, 2),
            top_p=_number(body, "top_p", 0, 1),
            top_k=_integer(body, "top_k", 1),  # vLLM / SGLang's extension
            stop=_stops(body.get("stop"), "stop"),
            seed=_integer(body, "seed"),
            presence_penalty=_number(body, "presence_penalty", -2, 2),
            frequency_penalty=_number(body, "frequency_penalty", -2, 2),
            parallel_tool_calls=parallel,
        )
        stream = bool(body.get("stream"))
        include = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        return WireRequest(chat, model, stream, include, advisor)

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
        message, usage = self._message(resp), openai_usage(resp.usage)
        if isinstance(resp, AdvisedResponse):
            # the whole turn's text; the consults as calls with their outputs, beside the tool calls
            text = "".join(
                seg.response.message.text for seg in resp.segments if isinstance(seg, IterationEnd)
            )
            message["content"] = text or (None if message.get("tool_calls") else "")
            message["advisor_calls"] = [
                {"id": seg.id, "type": "advisor", "output": seg.text, "error_code": seg.error_code}
                for seg in resp.segments
                if isinstance(seg, AdvisorResult)
            ]
            usage["iterations"] = [
                {"type": it.kind, "model": it.model, **openai_usage(it.usage)} for it in resp.iterations
            ]
        return {
            "id": f"chatcmpl-{_rid()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": self._finish(resp)}],
            "usage": usage,
        }

    def events(self, model: str, include_usage: bool) -> Events:
        return OpenAIEvents(self, model, include_usage)

    def error(self, status: int, kind: str, message: str) -> dict:
        return {"error": {"message": message, "type": kind, "code": kind, "param": None}}

    def stream_error(self, kind: str, message: str) -> str:
        return _sse(self.error(0, kind, message))


class OpenAIEvents(Events):
    """`chat.completion.chunk` events: the role first, then a chunk per delta (a tool call's first one
    carries its id and name), the finish reason, usage when asked (`stream_options.include_usage`),
    `[DONE]`. A failure is an error chunk, which the SDKs raise, and no `[DONE]`."""

    def __init__(self, wire: OpenAIWire, model: str, include_usage: bool):
        self.wire, self.include_usage = wire, include_usage
        self.base = {
            "id": f"chatcmpl-{_rid()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

    def _chunk(self, delta: dict, finish: str | None = None) -> str:
        return _sse({**self.base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def start(self) -> list[str]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def delta(self, delta: Delta) -> list[str]:
        if isinstance(delta, TextDelta):
            return [self._chunk({"content": delta.text})]
        if isinstance(delta, Ping):
            return [": ping\n\n"]  # an SSE comment: keeps the stream alive, clients skip it
        if isinstance(delta, AdvisorResult):
            call = {"id": delta.id, "type": "advisor", "output": delta.text, "error_code": delta.error_code}
            return [self._chunk({"advisor_calls": [call]})]
        if isinstance(delta, ReasoningDelta):
            return [self._chunk({"reasoning_content": delta.text})]
        if isinstance(delta, ToolCallDelta):
            call: dict[str, Any] = {"index": delta.index, "function": {"arguments": delta.arguments}}
            if delta.id is not None:
                call.update(id=delta.id, type="function")
                call["function"]["name"] = delta.name or ""
            return [self._chunk({"tool_calls": [call]})]
        return []

    def end(self, resp: ModelResponse) -> list[str]:
        out = [self._chunk({}, OpenAIWire._finish(resp))]
        if self.include_usage:
            out.append(_sse({**self.base, "choices": [], "usage": openai_usage(resp.usage)}))
        return out + ["data: [DONE]\n\n"]

    def fail(self, kind: str, message: str) -> list[str]:
        return [self.wire.stream_error(kind, message)]


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
        messages = from_anthropic_messages(body.get("system"), unfold_server_blocks(body.get("messages")))
        tools = []
        advisor = None
        for i, t in enumerate(body.get("tools") or []):
            if not isinstance(t, dict):
                raise ValueError(f"tools[{i}]: must be an object {{name, description, input_schema}}")
            if t.get("type") == ANTHROPIC_TYPE:
                advisor = parse_anthropic_tool(t, f"tools[{i}]")
                tools.append(advisor_tool_spec())
                continue
            if t.get("type") not in (None, "custom"):
                continue  # server tools (web search, ...) belong to Anthropic's API, not a proxied model
            tools.append(
                passthrough_tool(t.get("name"), t.get("description"), t.get("input_schema"), f"tools[{i}]")
            )
        choice = body.get("tool_choice")
        tool_choice: ToolChoice | None = None
        parallel = None
        if choice is not None:
            kind = choice.get("type") if isinstance(choice, dict) else None
            if kind not in _ANTHROPIC_CHOICE:
                raise ValueError(f"tool_choice: unsupported value {choice!r}")
            tool_choice = _ANTHROPIC_CHOICE[kind]
            if choice.get("disable_parallel_tool_use") is True:
                parallel = False
        cap = _max_tokens(body.get("max_tokens"), "max_tokens")
        chat = ChatRequest(
            messages,
            tools or None,
            tool_choice,
            None,
            cap,
            temperature=_number(body, "temperature", 0, 1),
            top_p=_number(body, "top_p", 0, 1),
            top_k=_integer(body, "top_k", 1),
            stop=_stops(body.get("stop_sequences"), "stop_sequences"),
            parallel_tool_calls=parallel,
        )
        return WireRequest(chat, model, bool(body.get("stream")), advisor=advisor)

    @staticmethod
    def _stop(resp: ModelResponse) -> str:
        finish = resp.finish_reason or ("tool_calls" if resp.message.tool_calls else "stop")
        return FINISH_TO_STOP.get(finish, finish)

    @staticmethod
    def _content(resp: ModelResponse) -> list[dict]:
        # the upstream's thinking stays out: its signature (if any) is the upstream endpoint's to replay
        return assistant_blocks(resp.message) or [{"type": "text", "text": ""}]

    def reply(self, resp: ModelResponse, model: str) -> dict:
        if isinstance(resp, AdvisedResponse):
            content = [b for seg in resp.segments for b in _advised_blocks(seg)] or [
                {"type": "text", "text": ""}
            ]
            usage = {**anthropic_usage(resp.usage), "iterations": _iterations(resp)}
        else:
            content, usage = self._content(resp), anthropic_usage(resp.usage)
        return {
            "id": f"msg_{_rid()}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": self._stop(resp),
            "stop_sequence": None,
            "usage": usage,
        }

    def events(self, model: str, include_usage: bool) -> Events:
        return AnthropicEvents(self, model)

    def error(self, status: int, kind: str, message: str) -> dict:
        return {"type": "error", "error": {"type": kind, "message": message}}

    def stream_error(self, kind: str, message: str) -> str:
        return _sse(self.error(0, kind, message), "error")


def _advised_blocks(segment: object) -> list[dict]:
    """One segment of an advised turn as Anthropic content blocks."""
    if isinstance(segment, IterationEnd):
        return assistant_blocks(segment.response.message)
    if isinstance(segment, AdvisorCall):
        return [{"type": "server_tool_use", "id": segment.id, "name": ADVISOR_TOOL, "input": {}}]
    if isinstance(segment, AdvisorResult):
        return [_advisor_result_block(segment)]
    return []


def _advisor_result_block(r: AdvisorResult) -> dict:
    if r.error_code is not None:
        content: dict = {"type": "advisor_tool_result_error", "error_code": r.error_code}
    else:
        content = {"type": "advisor_result", "text": r.text or ""}
    return {"type": "advisor_tool_result", "tool_use_id": r.id, "content": content}


def _iterations(resp: AdvisedResponse) -> list[dict]:
    out = []
    for it in resp.iterations:
        row = {"type": it.kind, **anthropic_usage(it.usage)}
        if it.kind == "advisor_message":
            row["model"] = it.model
        out.append(row)
    return out


class AnthropicEvents(Events):
    """Messages streaming events: `message_start`, a text or tool_use content block per run of deltas
    (opened at the first, closed when the next kind starts), `message_delta` with the stop reason and
    the usage (known only at the end of an OpenAI upstream's stream, so message_start counts zero),
    `message_stop`. Reasoning stays out, as in a non-streamed reply. A failure is an `error` event."""

    def __init__(self, wire: AnthropicWire, model: str):
        self.wire, self.model = wire, model
        self.index = -1  # the open content block, -1 before the first
        self.open: str | None = None  # "text", or "tool:<n>" for the tool call numbered n

    def start(self) -> list[str]:
        message = {
            "id": f"msg_{_rid()}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": anthropic_usage(Usage()),
        }
        return [_sse({"type": "message_start", "message": message}, "message_start")]

    def _block(self, key: str, block: dict) -> list[str]:
        out = self._close()
        self.index += 1
        self.open = key
        start = {"type": "content_block_start", "index": self.index, "content_block": block}
        return [*out, _sse(start, "content_block_start")]

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [_sse({"type": "content_block_stop", "index": self.index}, "content_block_stop")]

    def _delta(self, delta: dict) -> str:
        return _sse(
            {"type": "content_block_delta", "index": self.index, "delta": delta}, "content_block_delta"
        )

    def delta(self, delta: Delta) -> list[str]:
        if isinstance(delta, TextDelta):
            out = [] if self.open == "text" else self._block("text", {"type": "text", "text": ""})
            return [*out, self._delta({"type": "text_delta", "text": delta.text})]
        if isinstance(delta, Ping):
            return [_sse({"type": "ping"}, "ping")]
        if isinstance(delta, (AdvisorCall, AdvisorResult)):  # each block whole: its start, then its stop
            (block,) = _advised_blocks(delta)
            out = self._block("server", block)
            return out + self._close()
        if isinstance(delta, IterationEnd):
            out = self._close()  # the next executor call's blocks are new ones, whatever their kind
            return out
        if isinstance(delta, ToolCallDelta):
            key = f"tool:{delta.index}"
            out: list[str] = []
            if self.open != key:
                block = {"type": "tool_use", "id": delta.id or "", "name": delta.name or "", "input": {}}
                out = self._block(key, block)
            if delta.arguments:
                out.append(self._delta({"type": "input_json_delta", "partial_json": delta.arguments}))
            return out
        return []

    def end(self, resp: ModelResponse) -> list[str]:
        out = self._block("text", {"type": "text", "text": ""}) if self.index < 0 else []
        out += self._close()
        delta = {"stop_reason": AnthropicWire._stop(resp), "stop_sequence": None}
        usage = anthropic_usage(resp.usage)
        if isinstance(resp, AdvisedResponse):
            usage["iterations"] = _iterations(resp)
        out.append(_sse({"type": "message_delta", "delta": delta, "usage": usage}, "message_delta"))
        return out + [_sse({"type": "message_stop"}, "message_stop")]

    def fail(self, kind: str, message: str) -> list[str]:
        return [self.wire.stream_error(kind, message)]


OPENAI = OpenAIWire()
ANTHROPIC = AnthropicWire()
