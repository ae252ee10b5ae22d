"""Anthropic Messages API: `POST {base_url}/v1/messages` (base_url default https://api.anthropic.com;
a base_url that already ends in /v1 is accepted too).

Headers: `x-api-key` (from `api_key_env`) and `anthropic-version: 2023-06-01`, plus `config.headers`
(e.g. an `anthropic-beta` flag). System messages become the top-level `system`; tool results become
`tool_result` blocks inside a user turn (they can carry images); images are base64 `image` blocks;
tools use `ToolSpec.anthropic_schema()`; tool_choice auto/required/none -> auto/any/none. A call
with no tools (e.g. a frontier consult over the executor's history) writes earlier tool calls and
results as text, since Anthropic refuses tool_use/tool_result blocks in a request that defines no tools.

Effort -> extended thinking (`thinking: {type: enabled, budget_tokens: N}`), by default
low=1024, medium=4096, high=16384 tokens; no effort -> no thinking. Pass `thinking_budgets=` to change
it (a None budget turns thinking off for that level), or set `thinking` in `config.extra_body`, which
wins. The budget is added to the completion cap, so `max_tokens` (call, config, else 4096; Anthropic
requires one) still bounds the visible answer. Thinking is left off for a call that forces tool use
(`tool_choice="required"`, which Anthropic refuses with thinking), and for a call continuing a tool
turn whose thinking blocks this endpoint did not produce (Anthropic requires the signed thinking block
of that turn back; ones this endpoint received are kept, by tool-use id, and replayed).

Sampling: temperature, top_p, top_k as sent; `stop` as `stop_sequences`; `parallel_tool_calls=False`
as `tool_choice.disable_parallel_tool_use`; seed and the penalties have no Anthropic equivalent and are
not sent. With thinking on, the values Anthropic refuses then (temperature other than 1, top_k, top_p
below 0.95) are left out, since the effort asked for decides.

Usage: input = input_tokens, cached_input = cache_read_input_tokens, cache_write =
cache_creation_input_tokens, output = output_tokens. Anthropic does not report thinking tokens apart:
they are billed inside output_tokens, so reasoning = 0 here. Missing usage is estimated (thinking
counted as output) and marked `estimated=True`. stop_reason is normalised to OpenAI's finish_reason
names: end_turn/stop_sequence -> stop, tool_use -> tool_calls, max_tokens -> length.

Streaming: `stream()` sends `stream: true` and yields the text, thinking and tool-input deltas of the
Messages events as they arrive; `StreamFold` folds the events into the non-streamed `message` (usage
from message_start, updated by message_delta's cumulative counts), read by the same `parse_reply`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from advisor import fastjson
from advisor.endpoints.base import ChatRequest, EndpointConfig
from advisor.endpoints.estimate import estimate_usage
from advisor.endpoints.http import HTTPEndpoint, Parsed, decode_image
from advisor.endpoints.retry import AttemptFailed
from advisor.endpoints.stream import Delta, ReasoningDelta, TextDelta, ToolCallDelta
from advisor.messages import ImagePart, Message, TextPart, ToolCall, Usage

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
DEFAULT_THINKING_BUDGETS: dict[str, int | None] = {"low": 1024, "medium": 4096, "high": 16384}
_THINKING_CACHE = 512  # tool-use ids whose thinking blocks are kept for replay
STOP_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
}
FINISH_TO_STOP = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "length": "max_tokens",
    "content_filter": "refusal",
}
_TOOL_CHOICE = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}


def _refused_with_thinking(field: str, value: float) -> bool:
    """Sampling values Anthropic refuses when extended thinking is on (the effort asked wins)."""
    if field == "temperature":
        return value != 1
    if field == "top_p":
        return not 0.95 <= value <= 1
    return True  # top_k


def _image_block(image: ImagePart) -> dict:
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": image.media_type, "data": image.base64()},
    }


def _blocks(parts: list) -> list[dict]:
    out: list[dict] = []
    for p in parts:
        if isinstance(p, TextPart):
            if p.text:  # Anthropic rejects empty text blocks
                out.append({"type": "text", "text": p.text})
        else:
            out.append(_image_block(p))
    return out


def _tool_as_text(msg: Message) -> list[dict]:
    status = " (error)" if msg.is_error else ""
    head = f"[tool result {msg.tool_call_id}: {msg.name or 'tool'}{status}]"
    return [{"type": "text", "text": f"{head}\n{msg.text}" if msg.text else head}] + _blocks(msg.images)


def assistant_blocks(msg: Message, thinking: list[dict] | None = None) -> list[dict]:
    """An assistant message as Anthropic content blocks: the turn's signed `thinking` blocks first (when
    there are any), then its text and tool_use blocks."""
    blocks: list[dict] = list(thinking or [])
    if msg.text:
        blocks.append({"type": "text", "text": msg.text})
    for call in msg.tool_calls:
        args = call.arguments if call.arguments is not None else {}
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": args})
    return blocks


def parse_blocks(content: list) -> tuple[Message, list[dict]]:
    """Assistant content blocks -> (neutral message, its thinking / redacted_thinking blocks as sent)."""
    texts: list[str] = []
    thinking: list[str] = []
    thinking_blocks: list[dict] = []
    calls: list[ToolCall] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            thinking.append(block.get("thinking", ""))
            thinking_blocks.append(block)
        elif kind == "redacted_thinking":
            thinking_blocks.append(block)
        elif kind == "tool_use":
            raw = block.get("input")
            if isinstance(raw, dict):
                calls.append(ToolCall(block.get("id", ""), block.get("name", ""), raw, json.dumps(raw)))
            else:
                text = raw if isinstance(raw, str) else json.dumps(raw)
                error = f"tool input must be a JSON object, got {type(raw).__name__}"
                calls.append(ToolCall(block.get("id", ""), block.get("name", ""), None, text, error))
    message = Message.assistant("".join(texts), calls, "".join(thinking) if thinking else None)
    return message, thinking_blocks


def _user_parts(content: Any, where: str) -> list:
    if isinstance(content, str):
        return [TextPart(content)] if content else []
    if not isinstance(content, list):
        raise ValueError(f"{where}: must be a string or a list of content blocks")
    parts: list = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(TextPart(str(block.get("text") or "")))
        elif kind == "image":
            source = block.get("source") or {}
            if source.get("type") != "base64":
                raise ValueError(
                    f"{where}[{j}]: only base64 image sources are accepted (got {source.get('type')!r})"
                )
            parts.append(decode_image(source.get("data") or "", source.get("media_type"), f"{where}[{j}]"))
        elif kind in ("document", "search_result"):
            raise ValueError(f"{where}[{j}]: {kind} blocks are not supported")
        # other blocks (cache-control markers, server tool results) carry nothing the models need
    return parts


def from_anthropic_messages(system: Any, wire: Any) -> list[Message]:
    """An Anthropic request's `system` and `messages` -> neutral messages: the inverse of
    `AnthropicEndpoint.to_anthropic`. A user turn's tool_result blocks become tool messages (before its
    other content). Raises ValueError naming the offending block."""
    out: list[Message] = []
    if isinstance(system, str):
        if system:
            out.append(Message.system(system))
    elif isinstance(system, list):
        text = "\n\n".join(str(b.get("text") or "") for b in system if isinstance(b, dict))
        if text:
            out.append(Message.system(text))
    elif system is not None:
        raise ValueError("system: must be a string or a list of text blocks")
    if not isinstance(wire, list) or not wire:
        raise ValueError("messages: must be a non-empty list")
    names: dict[str, str] = {}
    for i, raw in enumerate(wire):
        where = f"messages[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: must be an object")
        role, content = raw.get("role"), raw.get("content")
        if role == "assistant":
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list):
                raise ValueError(f"{where}.content: must be a string or a list of content blocks")
            msg, _ = parse_blocks(blocks)
            names.update({c.id: c.name for c in msg.tool_calls})
            out.append(msg)
        elif role == "user":
            rest = content
            if isinstance(content, list):
                rest = []
                for j, block in enumerate(content):
                    if isinstance(block, dict) and block.get("type") == "tool_result":
                        call_id = str(block.get("tool_use_id") or "")
                        inner = block.get("content")
                        parts = _user_parts(
                            inner if inner is not None else [], f"{where}.content[{j}].content"
                        )
                        out.append(
                            Message(
                                "tool",
                                parts,
                                tool_call_id=call_id,
                                name=names.get(call_id),
                                is_error=bool(block.get("is_error")),
                            )
                        )
                    else:
                        rest.append(block)
            parts = _user_parts(rest, f"{where}.content")
            if parts or not isinstance(content, list) or len(rest) == len(content):
                out.append(Message("user", parts))
        elif role == "system":  # a mid-conversation system turn (Claude Code sends its environment so)
            parts = _user_parts(content, f"{where}.content")
            if any(not isinstance(p, TextPart) for p in parts):
                raise ValueError(f"{where}.content: a system turn holds text only")
            out.append(Message.system("".join(p.text for p in parts)))
        else:
            raise ValueError(f"{where}.role: must be user, assistant or system (got {role!r})")
    return out


def anthropic_usage(usage: Usage) -> dict:
    """Usage -> Anthropic usage: the inverse of `parse_usage` (thinking is billed inside output_tokens)."""
    return {
        "input_tokens": usage.input,
        "cache_read_input_tokens": usage.cached_input,
        "cache_creation_input_tokens": usage.cache_write,
        "output_tokens": usage.output + usage.reasoning,
    }


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def parse_usage(usage: Any) -> Usage | None:
    if not isinstance(usage, dict) or ("input_tokens" not in usage and "output_tokens" not in usage):
        return None
    return Usage(
        input=_int(usage.get("input_tokens")),
        cached_input=_int(usage.get("cache_read_input_tokens")),
        cache_write=_int(usage.get("cache_creation_input_tokens")),
        output=_int(usage.get("output_tokens")),
        reasoning=0,
    )


class StreamFold:
    """Folds Messages streaming events into the `message` a non-streamed reply would have been
    (`reply()`, read by the same `parse_reply`: thinking blocks keep their signatures for replay),
    returning each event's deltas for a caller that forwards them."""

    def __init__(self) -> None:
        self.message: dict[str, Any] = {"type": "message", "content": [], "stop_reason": None}
        self.blocks: dict[int, dict] = {}  # the event's block index -> the block so far
        self.json: dict[int, list[str]] = {}  # tool_use block index -> its input's JSON fragments
        self.calls: dict[int, int] = {}  # tool_use block index -> the call's ordinal
        self.error: Any = None
        self.done = False

    def feed(self, event: str | None, data: str) -> list[Delta]:
        try:
            ev = fastjson.loads(data)
        except json.JSONDecodeError as e:
            raise AttemptFailed(
                f"invalid stream event ({e.msg} at position {e.pos})", retryable=False
            ) from None
        if not isinstance(ev, dict):
            raise AttemptFailed(f"invalid stream event: a JSON {type(ev).__name__}", retryable=False)
        kind = ev.get("type") or event
        if kind == "message_start":
            start = ev.get("message") or {}
            self.message.update({k: v for k, v in start.items() if k != "content"})
        elif kind == "content_block_start":
            index, block = ev.get("index", len(self.blocks)), dict(ev.get("content_block") or {})
            self.blocks[index] = block
            if block.get("type") == "tool_use":
                self.json[index] = []
                self.calls[index] = len(self.calls)
                return [ToolCallDelta(self.calls[index], "", block.get("id", ""), block.get("name", ""))]
        elif kind == "content_block_delta":
            index, delta = ev.get("index"), ev.get("delta") or {}
            block = self.blocks.setdefault(index, {"type": "text", "text": ""})
            dtype = delta.get("type")
            if dtype == "text_delta" and delta.get("text"):
                block["text"] = block.get("text", "") + delta["text"]
                return [TextDelta(delta["text"])]
            if dtype == "thinking_delta" and delta.get("thinking"):
                block["thinking"] = block.get("thinking", "") + delta["thinking"]
                return [ReasoningDelta(delta["thinking"])]
            if dtype == "signature_delta":
                block["signature"] = block.get("signature", "") + (delta.get("signature") or "")
            elif dtype == "input_json_delta" and delta.get("partial_json") and index in self.calls:
                self.json[index].append(delta["partial_json"])
                return [ToolCallDelta(self.calls[index], delta["partial_json"])]
        elif kind == "message_delta":
            delta = ev.get("delta") or {}
            self.message["stop_reason"] = delta.get("stop_reason") or self.message["stop_reason"]
            if ev.get("usage"):  # cumulative counts; absent fields keep message_start's
                self.message["usage"] = {**(self.message.get("usage") or {}), **ev["usage"]}
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.error, self.done = ev.get("error") or {}, True
        return []

    def check_complete(self) -> None:
        if not self.done:
            raise AttemptFailed("stream ended before message_stop")  # cut off: worth a retry

    def reply(self) -> dict:
        if self.error is not None:
            return {"type": "error", "error": self.error}
        content = []
        for index in sorted(self.blocks):
            block = self.blocks[index]
            if index in self.json:
                text = "".join(self.json[index])
                try:
                    block = {**block, "input": json.loads(text) if text.strip() else block.get("input") or {}}
                except json.JSONDecodeError:
                    block = {**block, "input": text}  # parse_blocks reports a non-object input
            content.append(block)
        return {**self.message, "content": content}


class AnthropicEndpoint(HTTPEndpoint):
    """An Anthropic Messages endpoint. See the module docstring for the wire mapping."""

    default_base_url = "https://api.anthropic.com"
    path = "/v1/messages"
    stream_fold = StreamFold

    def __init__(
        self,
        name: str,
        config: EndpointConfig,
        *,
        thinking_budgets: dict[str, int | None] | None = None,
        **kwargs,
    ):
        super().__init__(name, config, **kwargs)
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        self.thinking_budgets = {**DEFAULT_THINKING_BUDGETS, **(thinking_budgets or {})}
        self._thinking: OrderedDict[str, list[dict]] = OrderedDict()

    # -- request -----------------------------------------------------------------------------

    def to_anthropic(self, messages: list[Message], native_tools: bool = True) -> tuple[str, list[dict]]:
        """Neutral messages -> (system text, Anthropic messages), merging adjacent user turns.

        With `native_tools=False` (a call that defines no tools) tool calls and results are written
        as text, because Anthropic refuses tool_use/tool_result blocks in a request without tools;
        a tool result's images are kept as image blocks.
        """
        system: list[str] = []
        wire: list[dict] = []

        def add(role: str, blocks: list[dict]) -> None:
            if wire and wire[-1]["role"] == role == "user":
                wire[-1]["content"].extend(blocks)
            else:
                wire.append({"role": role, "content": blocks})

        for msg in messages:
            if msg.role == "system":
                system.append(msg.text)
            elif msg.role == "user":
                add("user", _blocks(msg.content) or [{"type": "text", "text": "(empty)"}])
            elif msg.role == "assistant":
                add(
                    "assistant",
                    self._assistant_blocks(msg, native_tools) or [{"type": "text", "text": "(empty)"}],
                )
            elif msg.role == "tool":
                add("user", [self._tool_block(msg)] if native_tools else _tool_as_text(msg))
            else:
                raise ValueError(f"unknown message role {msg.role!r}")
        return "\n\n".join(s for s in system if s), wire

    def _assistant_blocks(self, msg: Message, native_tools: bool) -> list[dict]:
        if not native_tools:
            lines = [msg.text] if msg.text else []
            lines += [
                f"[tool call {c.id}: {c.name}({c.raw_arguments or json.dumps(c.arguments)})]"
                for c in msg.tool_calls
            ]
            return [{"type": "text", "text": "\n".join(lines)}] if lines else []
        # the signed thinking of this tool turn goes back first
        thinking = next((self._thinking[c.id] for c in msg.tool_calls if self._thinking.get(c.id)), None)
        return assistant_blocks(msg, thinking)

    @staticmethod
    def _tool_block(msg: Message) -> dict:
        result: dict[str, Any] = {
            "type": "tool_result",
            "tool_use_id": msg.tool_call_id,
            "content": _blocks(msg.content),
        }
        if msg.is_error:
            result["is_error"] = True
        return result

    def _thinking_allowed(self, messages: list[Message], tool_choice: str | None) -> bool:
        if tool_choice == "required":
            return False
        last = next((m for m in reversed(messages) if m.role == "assistant"), None)
        if last is None or not last.tool_calls:
            return True
        return any(c.id in self._thinking for c in last.tool_calls)

    def build_body(self, request: ChatRequest, stream: bool = False) -> dict:
        messages, tools, tool_choice, effort = (
            request.messages,
            request.tools,
            request.tool_choice,
            request.effort,
        )
        system, wire = self.to_anthropic(messages, native_tools=bool(tools))
        cap = request.max_tokens or self.config.max_tokens or DEFAULT_MAX_TOKENS
        body: dict[str, Any] = {"model": self.config.model, "messages": wire, "max_tokens": cap}
        if system:
            body["system"] = system
        if tools:
            body["tools"] = [t.anthropic_schema() for t in tools]
            if tool_choice:
                body["tool_choice"] = dict(_TOOL_CHOICE[tool_choice])
            if request.parallel_tool_calls is False and tool_choice != "none":
                body.setdefault("tool_choice", {"type": "auto"})["disable_parallel_tool_use"] = True
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        budget = self.thinking_budgets.get(effort) if effort else None
        thinking = bool(budget and (not tools or self._thinking_allowed(messages, tool_choice)))
        if thinking:
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
            body["max_tokens"] = cap + budget  # max_tokens counts thinking too; keep the visible cap
        for field in ("temperature", "top_p", "top_k"):
            value = getattr(request, field)
            if value is not None and not (thinking and _refused_with_thinking(field, value)):
                body[field] = value
        if stream:
            body["stream"] = True
        body.update(self.config.extra_body)
        return body

    def headers(self) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION, **self.config.headers}
        key = self.api_key()
        if key:
            headers["x-api-key"] = key
        return headers

    # -- reply -------------------------------------------------------------------------------

    def parse_reply(self, data: dict) -> tuple[Message, str | None]:
        if data.get("type") == "error":
            err = data.get("error") or {}
            kind = err.get("type", "error") if isinstance(err, dict) else "error"
            msg = err.get("message", "") if isinstance(err, dict) else str(err)
            raise AttemptFailed(
                f"provider error in a 200 reply: {kind}: {msg}",
                retryable=kind in ("overloaded_error", "api_error"),
            )
        content = data.get("content")
        if not isinstance(content, list):
            raise AttemptFailed("invalid response: no content blocks", retryable=False)
        message, thinking_blocks = parse_blocks(content)
        if message.tool_calls and thinking_blocks:
            self._remember_thinking(message.tool_calls[0].id, thinking_blocks)
        stop = data.get("stop_reason")
        return message, STOP_TO_FINISH.get(stop, stop)

    def _remember_thinking(self, tool_use_id: str, blocks: list[dict]) -> None:
        self._thinking[tool_use_id] = blocks
        while len(self._thinking) > _THINKING_CACHE:
            self._thinking.popitem(last=False)

    def _parser(self, request: ChatRequest, body: dict) -> Callable[[dict], Parsed]:
        schemas = body.get("tools") or []

        def parse(data: dict) -> Parsed:
            message, finish = self.parse_reply(data)
            usage = parse_usage(data.get("usage"))
            if usage is None:
                usage = estimate_usage(request.messages, schemas, message)
                usage.output, usage.reasoning = usage.output + usage.reasoning, 0  # thinking bills as output
            return Parsed(message, usage, finish, data.get("model") or "")

        return parse
