"""A reply as it arrives: the deltas `Endpoint.stream` yields, whatever the provider.

A stream is text, reasoning and tool-call deltas in the order the model produced them, then exactly
one `StreamEnd` holding the whole `ModelResponse` (message, usage, finish reason, attempts), the same
one `complete` would have returned. A `ToolCallDelta` opens a call when it carries the call's id and
name (its first fragment), and `index` numbers the message's calls 0, 1, ... in order, whatever the
provider numbers them by.

`deltas_of` renders a complete message as deltas, so a reply that was not streamed (the embedded
engine, a replay) goes down the same path as one that was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from advisor import fastjson
from advisor.messages import Message, ModelResponse, ToolCall


@dataclass
class TextDelta:
    text: str


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ToolCallDelta:
    index: int
    arguments: str = ""  # a fragment of the JSON arguments
    id: str | None = None  # set on a call's first delta, with its name
    name: str | None = None


@dataclass
class StreamEnd:
    response: ModelResponse


Delta = TextDelta | ReasoningDelta | ToolCallDelta | StreamEnd


def parse_arguments(raw: Any) -> tuple[dict | None, str, str | None]:
    """(arguments, raw text, parse error) from a tool call's arguments as the server sent them."""
    if isinstance(raw, dict):
        return raw, json.dumps(raw), None
    if raw is None:
        return {}, "", None
    text = raw if isinstance(raw, str) else json.dumps(raw)
    if not text.strip():
        return {}, text, None
    try:
        value = fastjson.loads(text)
    except json.JSONDecodeError as e:
        return None, text, f"arguments are not valid JSON ({e.msg} at position {e.pos})"
    if not isinstance(value, dict):
        return None, text, f"arguments must be a JSON object, got {type(value).__name__}"
    return value, text, None


def wire_arguments(call: ToolCall) -> str:
    """A call's arguments as JSON text for a wire: the parsed object, else the raw text when that is
    valid JSON, else "{}" (servers that re-parse arguments reject invalid JSON)."""
    if call.arguments is not None:
        return json.dumps(call.arguments)
    try:
        if isinstance(json.loads(call.raw_arguments), dict):
            return call.raw_arguments
    except (json.JSONDecodeError, TypeError):
        pass
    return "{}"


def deltas_of(message: Message) -> list[Delta]:
    """A complete assistant message as the deltas a stream of it would carry (no StreamEnd)."""
    out: list[Delta] = []
    if message.reasoning:
        out.append(ReasoningDelta(message.reasoning))
    if message.text:
        out.append(TextDelta(message.text))
    for i, call in enumerate(message.tool_calls):
        out.append(ToolCallDelta(i, wire_arguments(call), call.id, call.name))
    return out
