"""OpenAI-compatible chat completions: OpenAI, vLLM, SGLang, OpenRouter, StepFun's API, llama.cpp, ...

Request: `POST {base_url}/chat/completions` with `Authorization: Bearer $KEY` when `api_key_env` is set.
- images go as `image_url` parts holding a data URL; a tool message cannot carry images, so the images of
  a run of consecutive tool messages are moved into one user message right after that run (a user
  message between two tool results would break the tool-call/tool-result pairing);
- assistant tool calls are sent with JSON-string arguments; a call whose arguments never parsed is
  sent with its raw text when that is valid JSON, else "{}" (servers that re-parse arguments reject
  invalid JSON; the tool message after it already tells the model what went wrong);
- assistant reasoning is not sent back (several servers reject `reasoning_content` in requests);
- effort goes as `reasoning_effort`; `max_tokens` from the call or the config; the sampling fields
  (temperature, top_p, top_k, stop, seed, presence/frequency_penalty) under their own names when set,
  `parallel_tool_calls` with tools only; `config.extra_body` is merged last (shallow), so it can
  override any field.

Streaming: `stream()` sends `stream: true` with `stream_options.include_usage` and yields each chunk's
deltas as it arrives; `complete()` streams too when asked (see `OpenAIEndpoint`). Either way
`StreamFold` folds the chunks into the non-streamed reply's shape, read by the same `parse_reply`.

Reply: reasoning is read from `reasoning_content` or `reasoning`; tool-call arguments that are not a
JSON object give a `ToolCall` with `arguments=None` and `parse_error` set (never an exception).

Usage: input = prompt_tokens - cached; cached_input = prompt_tokens_details.cached_tokens (or
DeepSeek's prompt_cache_hit_tokens); output = completion_tokens - reasoning; reasoning =
completion_tokens_details.reasoning_tokens. When the server sends no usage, it is estimated from text
length (see `advisor.endpoints.estimate`) and marked `estimated=True`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from advisor import fastjson
from advisor.endpoints.base import ChatRequest, EndpointConfig
from advisor.endpoints.estimate import estimate_usage
from advisor.endpoints.http import HTTPEndpoint, Parsed, decode_image
from advisor.endpoints.retry import AttemptFailed, retryable_status
from advisor.endpoints.stream import (
    Delta,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    parse_arguments,
    wire_arguments,
)
from advisor.messages import ImagePart, Message, TextPart, ToolCall, Usage


def _content(parts: list) -> str | list[dict]:
    if all(isinstance(p, TextPart) for p in parts):
        return "".join(p.text for p in parts)
    out: list[dict] = []
    for p in parts:
        if isinstance(p, TextPart):
            out.append({"type": "text", "text": p.text})
        else:
            out.append({"type": "image_url", "image_url": {"url": p.data_url()}})
    return out


def to_openai_messages(messages: list[Message]) -> list[dict]:
    """Neutral messages -> OpenAI chat messages (see the module docstring for the tool-image rule)."""
    wire: list[dict] = []
    pending_images: list[tuple[Message, list[ImagePart]]] = []

    def flush_images() -> None:
        if not pending_images:
            return
        parts: list = []
        for msg, images in pending_images:
            label = (
                f"Images returned by tool call {msg.tool_call_id}"
                + (f" ({msg.name})" if msg.name else "")
                + ":"
            )
            parts.append(TextPart(label))
            parts.extend(images)
        wire.append({"role": "user", "content": _content(parts)})
        pending_images.clear()

    for msg in messages:
        if msg.role != "tool":
            flush_images()
        if msg.role == "system":
            wire.append({"role": "system", "content": msg.text})
        elif msg.role == "user":
            wire.append({"role": "user", "content": _content(msg.content)})
        elif msg.role == "assistant":
            out: dict[str, Any] = {"role": "assistant", "content": msg.text or None}
            if msg.tool_calls:
                out["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": wire_arguments(c)},
                    }
                    for c in msg.tool_calls
                ]
            elif out["content"] is None:
                out["content"] = ""
            wire.append(out)
        elif msg.role == "tool":
            # no "name" field: OpenAI's tool message has none and strict servers reject unknown fields
            wire.append({"role": "tool", "tool_call_id": msg.tool_call_id, "content": msg.text})
            if msg.images:
                pending_images.append((msg, msg.images))
        else:
            raise ValueError(f"unknown message role {msg.role!r}")
    flush_images()
    return wire


def image_from_data_url(url: str, where: str) -> ImagePart:
    """An image part from a `data:<type>;base64,...` URL; anything else is refused (nothing is fetched)."""
    head, sep, data = url.partition(",")
    if not (sep and head.startswith("data:") and head.endswith(";base64")):
        raise ValueError(f"{where}: only base64 data URLs are accepted for images (got {url[:40]!r})")
    return decode_image(data, head[5 : -len(";base64")], where)


def _parts(content: Any, where: str) -> list:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextPart(content)] if content else []
    if not isinstance(content, list):
        raise ValueError(f"{where}.content: must be a string or a list of parts")
    parts: list = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(TextPart(str(part.get("text") or "")))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            parts.append(image_from_data_url(str(url or ""), f"{where}.content[{j}]"))
        else:
            raise ValueError(f"{where}.content[{j}]: unsupported part type {kind!r} (text, image_url)")
    return parts


def from_openai_messages(wire: Any) -> list[Message]:
    """OpenAI chat messages (a request's `messages`) -> neutral messages: the inverse of
    `to_openai_messages`. Raises ValueError naming the offending message."""
    if not isinstance(wire, list) or not wire:
        raise ValueError("messages: must be a non-empty list")
    names: dict[str, str] = {}  # tool-call id -> tool name, for the tool messages that answer it
    out: list[Message] = []
    for i, raw in enumerate(wire):
        where = f"messages[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: must be an object")
        role = raw.get("role")
        if role in ("system", "developer"):
            out.append(Message("system", _parts(raw.get("content"), where)))
        elif role == "user":
            out.append(Message("user", _parts(raw.get("content"), where)))
        elif role == "assistant":
            calls = []
            for k, tc in enumerate(raw.get("tool_calls") or []):
                if not isinstance(tc, dict) or not isinstance(tc.get("function") or {}, dict):
                    raise ValueError(f"{where}.tool_calls[{k}]: must be an object with a function object")
                fn = tc.get("function") or {}
                args, raw_args, error = parse_arguments(fn.get("arguments"))
                call_id = tc.get("id") or f"call_{i}_{k}"
                names[call_id] = fn.get("name") or ""
                calls.append(ToolCall(call_id, fn.get("name") or "", args, raw_args, error))
            text = "".join(p.text for p in _parts(raw.get("content"), where) if isinstance(p, TextPart))
            reasoning = raw.get("reasoning_content") or raw.get("reasoning")
            out.append(Message.assistant(text, calls, reasoning if isinstance(reasoning, str) else None))
        elif role == "tool":
            call_id = raw.get("tool_call_id")
            if not isinstance(call_id, str):
                raise ValueError(f"{where}.tool_call_id: a tool message needs the id of the call it answers")
            msg = Message("tool", _parts(raw.get("content"), where), tool_call_id=call_id)
            msg.name = raw.get("name") or names.get(call_id)
            out.append(msg)
        else:
            raise ValueError(
                f"{where}.role: unknown role {role!r} (system, developer, user, assistant, tool)"
            )
    return out


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def parse_usage(usage: Any) -> Usage | None:
    """OpenAI usage -> Usage, or None when the server sent none."""
    if not isinstance(usage, dict) or ("prompt_tokens" not in usage and "completion_tokens" not in usage):
        return None
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    cached = cached or _int(usage.get("prompt_cache_hit_tokens"))
    reasoning = (
        _int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0
    )
    cached = min(cached, prompt)
    reasoning = min(reasoning, completion)
    return Usage(
        input=prompt - cached, cached_input=cached, output=completion - reasoning, reasoning=reasoning
    )


def openai_usage(usage: Usage) -> dict:
    """Usage -> OpenAI usage: the inverse of `parse_usage`."""
    prompt = usage.input + usage.cached_input + usage.cache_write
    completion = usage.output + usage.reasoning
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning},
    }


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some servers return content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def parse_reply(data: dict) -> tuple[Message, str | None]:
    choices = data.get("choices")
    if not choices:
        err = data.get("error")
        if err:  # some proxies answer 200 with an error body
            msg = err.get("message", err) if isinstance(err, dict) else err
            code = err.get("code") if isinstance(err, dict) else None
            status = code if isinstance(code, int) else None
            raise AttemptFailed(
                f"provider error in a 200 reply: {msg}",
                status=status,
                retryable=status is not None and retryable_status(status),
            )
        raise AttemptFailed("invalid response: no choices", retryable=False)
    choice = choices[0]
    raw = choice.get("message") or {}
    reasoning = raw.get("reasoning_content") or raw.get("reasoning")
    calls = []
    for i, tc in enumerate(raw.get("tool_calls") or []):
        fn = tc.get("function") or {}
        args, raw_args, error = parse_arguments(fn.get("arguments"))
        calls.append(ToolCall(tc.get("id") or f"call_{i}", fn.get("name") or "", args, raw_args, error))
    message = Message.assistant(
        _text(raw.get("content")), calls, reasoning if isinstance(reasoning, str) else None
    )
    return message, choice.get("finish_reason")


class StreamFold:
    """Folds OpenAI stream chunks into the dict a non-streamed reply would have been (`reply()`, which
    `parse_reply` reads as ever), returning each chunk's deltas for a caller that forwards them."""

    def __init__(self) -> None:
        self.model = ""
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict] = {}  # the server's tool-call index -> the call so far
        self.finish: str | None = None
        self.usage: dict | None = None
        self.error: Any = None
        self.done = False  # [DONE], or an error chunk: nothing more to read

    def feed(self, event: str | None, data: str) -> list[Delta]:
        if data == "[DONE]":
            self.done = True
            return []
        try:
            chunk = fastjson.loads(data)
        except json.JSONDecodeError as e:
            raise AttemptFailed(
                f"invalid stream chunk ({e.msg} at position {e.pos})", retryable=False
            ) from None
        if not isinstance(chunk, dict):
            raise AttemptFailed(f"invalid stream chunk: a JSON {type(chunk).__name__}", retryable=False)
        if chunk.get("error") and not chunk.get("choices"):
            self.error, self.done = chunk["error"], True  # parse_reply makes it a (maybe retryable) failure
            return []
        self.model = chunk.get("model") or self.model
        self.usage = chunk.get("usage") or self.usage
        out: list[Delta] = []
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(thought, str) and thought:
                self.reasoning.append(thought)
                out.append(ReasoningDelta(thought))
            if isinstance(delta.get("content"), str) and delta["content"]:
                self.content.append(delta["content"])
                out.append(TextDelta(delta["content"]))
            for tc in delta.get("tool_calls") or []:
                key = tc.get("index", len(self.calls))
                fn = tc.get("function") or {}
                fresh = key not in self.calls
                slot = self.calls.setdefault(
                    key, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                )
                slot["id"] = tc.get("id") or slot["id"]
                if fn.get("name") and not slot["function"]["name"]:
                    slot["function"]["name"] = fn["name"]
                piece = fn.get("arguments") if isinstance(fn.get("arguments"), str) else ""
                slot["function"]["arguments"] += piece
                ordinal = list(self.calls).index(key)
                if fresh:
                    call_id = slot["id"] or f"call_{ordinal}"
                    out.append(ToolCallDelta(ordinal, piece, call_id, slot["function"]["name"]))
                elif piece:
                    out.append(ToolCallDelta(ordinal, piece))
            self.finish = choice.get("finish_reason") or self.finish
        return out

    def check_complete(self) -> None:
        if not self.done and self.finish is None:
            raise AttemptFailed("stream ended before a finish_reason or [DONE]")  # cut off: worth a retry

    def reply(self) -> dict:
        if self.error is not None:
            return {"error": self.error}
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = [
                {**call, "id": call["id"] or f"call_{i}"} for i, call in enumerate(self.calls.values())
            ]
        out: dict[str, Any] = {
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish}],
        }
        if self.usage:
            out["usage"] = self.usage
        return out


# ChatRequest fields sent under their own names (top_k: vLLM / SGLang take it; OpenAI's API has none,
# and a client only sets it when it speaks Anthropic to a proxy)
_SAMPLING = ("temperature", "top_p", "top_k", "stop", "seed", "presence_penalty", "frequency_penalty")


class OpenAIEndpoint(HTTPEndpoint):
    """An OpenAI-compatible chat-completions endpoint. See the module docstring for the wire mapping.

    `stream=True` (or `stream: true` in `config.extra_body`) streams the reply with
    `stream_options.include_usage`; the result is the same `ModelResponse`.
    """

    path = "/chat/completions"
    stream_fold = StreamFold

    def __init__(self, name: str, config: EndpointConfig, *, stream: bool | None = None, **kwargs):
        super().__init__(name, config, **kwargs)
        self.streams = bool(config.extra_body.get("stream")) if stream is None else stream

    def build_body(self, request: ChatRequest, stream: bool = False) -> dict:
        body: dict[str, Any] = {"model": self.config.model, "messages": to_openai_messages(request.messages)}
        if request.tools:
            body["tools"] = [t.openai_schema() for t in request.tools]
            if request.tool_choice:
                body["tool_choice"] = request.tool_choice
            if request.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = request.parallel_tool_calls
        if request.effort:
            body["reasoning_effort"] = request.effort
        for field in _SAMPLING:
            value = getattr(request, field)
            if value is not None:
                body[field] = value
        cap = request.max_tokens or self.config.max_tokens
        if cap:
            body["max_tokens"] = cap
        if stream or self.streams:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}  # else streamed replies carry no usage
        body.update(self.config.extra_body)
        if stream:  # a stream() call reads SSE, whatever extra_body says
            body["stream"] = True
        return body

    def headers(self) -> dict[str, str]:
        headers = dict(self.config.headers)
        key = self.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _parser(self, request: ChatRequest, body: dict) -> Callable[[dict], Parsed]:
        schemas = body.get("tools") or []

        def parse(data: dict) -> Parsed:
            message, finish = parse_reply(data)
            usage = parse_usage(data.get("usage")) or estimate_usage(request.messages, schemas, message)
            return Parsed(message, usage, finish, data.get("model") or "")

        return parse
