"""The OpenAI Responses API (`POST /v1/responses`) as a third client wire of the proxy, beside chat
completions and Messages: Codex CLI speaks only this, and it is the OpenAI Agents SDK's default.

A request's `input` (a string, or items: `message`, `function_call`, `function_call_output`,
`reasoning` passed back) and `instructions` become the neutral `ChatRequest`, which the router sends to
either kind of upstream as for the other wires. The reply is a `response` object, or its server-sent
events (`response.created` ... `response.completed`, each with its `sequence_number`), as the official
`openai` SDK and Codex parse them.

`previous_response_id`: the proxy keeps the conversations of its last responses in memory (LRU,
`sessions.responses_kept` in proxy.yaml) and puts the stored one before the new input; the earlier
`instructions` are not carried over, as OpenAI documents. The session of a request: the
`x-advisor-session` header, else `prompt_cache_key` (Codex sends its conversation id there), else the
hash of its system prompt and first user message, as on the other wires.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from advisor.endpoints.base import ChatRequest, ToolChoice
from advisor.endpoints.openai import image_from_data_url
from advisor.endpoints.stream import (
    Delta,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    parse_arguments,
    wire_arguments,
)
from advisor.messages import Message, ModelResponse, TextPart, ToolCall, Usage
from advisor.proxy.wire import (
    Events,
    Wire,
    WireRequest,
    _integer,
    _max_tokens,
    _model,
    _number,
    _sse,
    passthrough_tool,
)

_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


def _id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(12).hex()}"


def responses_usage(usage: Usage) -> dict:
    prompt = usage.input + usage.cached_input + usage.cache_write
    completion = usage.output + usage.reasoning
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": usage.cached_input},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning},
        "total_tokens": prompt + completion,
    }


class ResponseStore:
    """The conversations of the last `size` responses (id -> messages, instructions excluded), LRU."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, list[Message]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, response_id: str) -> list[Message] | None:
        with self._lock:
            found = self._items.get(response_id)
            if found is not None:
                self._items.move_to_end(response_id)
            return found

    def put(self, response_id: str, messages: list[Message]) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[response_id] = messages
            self._items.move_to_end(response_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class ResponsesRequest(WireRequest):
    body: dict = field(default_factory=dict)
    history: list[Message] = field(default_factory=list)  # the conversation, instructions excluded
    tools_wire: list[dict] = field(default_factory=list)
    store: bool = True


def _text_parts(content: Any, where: str, allowed: tuple[str, ...]) -> list:
    if isinstance(content, str):
        return [TextPart(content)] if content else []
    if not isinstance(content, list):
        raise ValueError(f"{where}.content: must be a string or a list of content parts")
    parts: list = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed:
            raise ValueError(
                f"{where}.content[{j}].type: unsupported content part {kind!r} (accepted here: {', '.join(allowed)})"
            )
        if kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise ValueError(
                    f"{where}.content[{j}].image_url: send the image as a base64 data URL (file_id is not served)"
                )
            parts.append(image_from_data_url(url, f"{where}.content[{j}]"))
        elif kind == "refusal":
            parts.append(TextPart(str(part.get("refusal") or "")))
        else:
            parts.append(TextPart(str(part.get("text") or "")))
    return parts


def parse_input(raw: Any, history: list[Message]) -> list[Message]:
    """`input` -> neutral messages appended to `history` (the previous response's conversation).
    Raises ValueError naming the offending item."""
    out = list(history)
    if isinstance(raw, str):
        out.append(Message.user(raw))
        return out
    if not isinstance(raw, list) or not raw:
        raise ValueError("input: must be a string or a non-empty list of items")
    calls: dict[str, str] = {c.id: c.name for m in history for c in m.tool_calls}
    reasoning: list[str] = []  # reasoning items passed back: the next assistant turn's reasoning

    def assistant() -> Message:
        # function calls and the text before them are one assistant turn, as the chat wires send it
        if out and out[-1].role == "assistant":
            return out[-1]
        msg = Message.assistant("", [], None)
        out.append(msg)
        return msg

    def take_reasoning(msg: Message) -> None:
        if reasoning:
            msg.reasoning = (msg.reasoning or "") + "\n".join(reasoning)
            reasoning.clear()

    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role in ("system", "developer"):
                out.append(Message("system", _text_parts(item.get("content"), where, ("input_text",))))
            elif role == "user":
                parts = _text_parts(item.get("content"), where, ("input_text", "input_image"))
                out.append(Message("user", parts))
            elif role == "assistant":
                parts = _text_parts(item.get("content"), where, ("output_text", "refusal", "input_text"))
                text = "".join(p.text for p in parts)
                if out and out[-1].role == "assistant" and not out[-1].tool_calls:
                    msg = out[-1]
                    msg.content = [TextPart(msg.text + text)]
                else:
                    msg = Message.assistant(text, [], None)
                    out.append(msg)
                take_reasoning(msg)
            else:
                raise ValueError(f"{where}.role: unknown role {role!r} (user, assistant, system, developer)")
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not call_id:
                raise ValueError(f"{where}.call_id: a function_call needs its call_id")
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}.name: a function_call needs the function's name")
            args, raw_args, error = parse_arguments(item.get("arguments"))
            msg = assistant()
            msg.tool_calls.append(ToolCall(call_id, name, args, raw_args, error))
            take_reasoning(msg)
            calls[call_id] = name
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or call_id not in calls:
                raise ValueError(
                    f"{where}.call_id: no function_call with call_id {call_id!r} precedes this output"
                )
            output = item.get("output")
            parts = _text_parts(output, where, ("input_text", "input_image")) if output else []
            msg = Message("tool", parts, tool_call_id=call_id, name=calls[call_id])
            out.append(msg)
        elif kind == "reasoning":
            summary = item.get("summary") or []
            if not isinstance(summary, list):
                raise ValueError(f"{where}.summary: must be a list of summary_text parts")
            text = "\n".join(
                str(s.get("text") or "") for s in summary if isinstance(s, dict) and s.get("text")
            )
            if text:
                reasoning.append(text)
        else:
            raise ValueError(
                f"{where}.type: unknown item type {kind!r} (the proxy accepts {', '.join(_ITEM_TYPES)})"
            )
    return out


def _tools(raw: Any) -> tuple[list, list[dict]]:
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        raise ValueError("tools: must be a list")
    specs, wire = [], []
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise ValueError(f"tools[{i}]: must be an object {{type: function, name, parameters}}")
        kind = t.get("type")
        if kind != "function":
            raise ValueError(
                f"tools[{i}].type: {kind!r} tools are not served by the advisor proxy (function tools only)"
            )
        specs.append(
            passthrough_tool(t.get("name"), t.get("description"), t.get("parameters"), f"tools[{i}]")
        )
        wire.append(t)
    return specs, wire


def _tool_choice(choice: Any) -> ToolChoice | None:
    if choice in (None, "auto", "none", "required"):
        return choice
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function":
            return "required"  # a named function: the neutral request can only insist on a call
        if kind == "allowed_tools":
            mode = choice.get("mode", "auto")
            if mode in ("auto", "required"):
                return mode
    raise ValueError(f"tool_choice: unsupported value {choice!r}")


class ResponsesWire(Wire):
    """`POST /v1/responses`, with its store of recent responses for `previous_response_id`."""

    name = "responses"

    def __init__(self, kept: int = 1000):
        self.store = ResponseStore(kept)

    def parse(self, body: Any) -> ResponsesRequest:
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        model = _model(body)
        for name in ("background", "conversation", "prompt"):
            if body.get(name):
                raise ValueError(f"{name}: not served by the advisor proxy")
        history: list[Message] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            found = self.store.get(previous) if isinstance(previous, str) else None
            if found is None:
                raise ValueError(
                    f"previous_response_id: no response {previous!r} in this proxy's store (it keeps the last "
                    f"{self.store.size} stored responses, in memory; send the whole input instead)"
                )
            history = found
        messages = parse_input(body.get("input"), history)
        conversation = list(messages)
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise ValueError("instructions: must be a string")
        if instructions:
            messages.insert(0, Message.system(instructions))
        tools, tools_wire = _tools(body.get("tools"))
        parallel = body.get("parallel_tool_calls")
        if parallel is not None and not isinstance(parallel, bool):
            raise ValueError(f"parallel_tool_calls: must be true or false (got {parallel!r})")
        reasoning = body.get("reasoning")
        if reasoning is not None:
            if not isinstance(reasoning, dict):
                raise ValueError("reasoning: must be an object {effort, summary}")
            effort = reasoning.get("effort")
            if effort is not None and effort not in _EFFORTS:
                raise ValueError(f"reasoning.effort: must be one of {', '.join(_EFFORTS)} (got {effort!r})")
        text = body.get("text")
        if text is not None:
            fmt = text.get("format") if isinstance(text, dict) else None
            kind = fmt.get("type") if isinstance(fmt, dict) else (None if fmt is None else fmt)
            if kind not in (None, "text"):
                raise ValueError(
                    f"text.format.type: {kind!r} is not supported by the advisor proxy (only text)"
                )
        include = body.get("include")
        if include is not None and not (
            isinstance(include, list) and all(isinstance(x, str) for x in include)
        ):
            raise ValueError("include: must be a list of strings")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError("metadata: must be an object of strings")
        store = body.get("store", True)
        if not isinstance(store, bool):
            raise ValueError(f"store: must be true or false (got {store!r})")
        chat = ChatRequest(
            messages,
            tools or None,
            _tool_choice(body.get("tool_choice")),
            None,
            _max_tokens(body.get("max_output_tokens"), "max_output_tokens"),
            temperature=_number(body, "temperature", 0, 2),
            top_p=_number(body, "top_p", 0, 1),
            top_k=_integer(body, "top_k", 1),
            parallel_tool_calls=parallel,
        )
        key = body.get("prompt_cache_key")
        return ResponsesRequest(
            chat,
            model,
            bool(body.get("stream")),
            session=key if isinstance(key, str) and key else None,
            body=body,
            history=conversation,
            tools_wire=tools_wire,
            store=store,
        )

    # -- replies -------------------------------------------------------------------------------
    def skeleton(self, parsed: ResponsesRequest, response_id: str, status: str) -> dict:
        body = parsed.body
        reasoning = body.get("reasoning") or {}
        return {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": parsed.model,
            "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "store": parsed.store,
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": parsed.tools_wire,
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": None,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }

    def finish(
        self, parsed: ResponsesRequest, response_id: str, resp: ModelResponse, output: list[dict]
    ) -> dict:
        """The whole response object, and the conversation stored for a later previous_response_id."""
        finish = resp.finish_reason
        status, details = "completed", None
        if finish == "length":
            status, details = "incomplete", {"reason": "max_output_tokens"}
        elif finish == "content_filter":
            status, details = "incomplete", {"reason": "content_filter"}
        out = self.skeleton(parsed, response_id, status)
        out.update(output=output, incomplete_details=details, usage=responses_usage(resp.usage))
        if parsed.store:
            self.store.put(response_id, [*parsed.history, resp.message])
        return out

    def reply_to(self, parsed: WireRequest, resp: ModelResponse) -> dict:
        assert isinstance(parsed, ResponsesRequest)
        return self.finish(parsed, _id("resp"), resp, output_items(resp.message))

    def events_for(self, parsed: WireRequest) -> Events:
        assert isinstance(parsed, ResponsesRequest)
        return ResponsesEvents(self, parsed)

    def error(self, status: int, kind: str, message: str) -> dict:
        param = message.removeprefix("advisor proxy: ").split(":", 1)[0] if status == 400 else None
        if param is not None and (" " in param or not param):
            param = None
        return {"error": {"message": message, "type": kind, "param": param, "code": kind}}

    def stream_error(self, kind: str, message: str) -> str:
        return _sse({"type": "error", "code": kind, "message": message, "param": None}, "error")


def _message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [_text_part(text)] if status == "completed" else [],
    }


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _reasoning_item(item_id: str, text: str | None) -> dict:
    summary = [{"type": "summary_text", "text": text}] if text else []
    return {"type": "reasoning", "id": item_id, "summary": summary, "status": "completed"}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(message: Message) -> list[dict]:
    """An assistant message as Responses output items: its reasoning, its text, its function calls."""
    out: list[dict] = []
    if message.reasoning:
        out.append(_reasoning_item(_id("rs"), message.reasoning))
    if message.text or not message.tool_calls:
        out.append(_message_item(_id("msg"), message.text))
    for call in message.tool_calls:
        out.append(_call_item(_id("fc"), call.id, call.name, wire_arguments(call)))
    return out


class ResponsesEvents(Events):
    """A response's server-sent events: `response.created`, `response.in_progress`, then per output
    item its `output_item.added`, its deltas (`reasoning_summary_text.delta`, `output_text.delta`,
    `function_call_arguments.delta`) and its closing events up to `output_item.done`, each item closed
    when the next kind starts; then `response.completed` (or `.incomplete`). A failure after the
    first byte is `response.failed`."""

    def __init__(self, wire: ResponsesWire, parsed: ResponsesRequest):
        self.wire, self.parsed = wire, parsed
        self.rid = _id("resp")
        self.seq = 0
        self.items: list[dict] = []  # the output items so far, the last one open while `open` is set
        self.open: str | None = None  # "text", "reasoning" or "tool:<n>"
        self.buffer = ""  # the open item's text or arguments so far

    def _ev(self, kind: str, **data: Any) -> str:
        event = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return _sse(event, kind)

    def _response(self, status: str) -> dict:
        return self.wire.skeleton(self.parsed, self.rid, status)

    def start(self) -> list[str]:
        return [
            self._ev("response.created", response=self._response("in_progress")),
            self._ev("response.in_progress", response=self._response("in_progress")),
        ]

    def _add(self, key: str, item: dict) -> list[str]:
        out = self._close()
        self.open, self.buffer = key, ""
        self.items.append(item)
        index = len(self.items) - 1
        out.append(self._ev("response.output_item.added", output_index=index, item=item))
        kind = item["type"]
        if kind == "message":
            out.append(
                self._ev(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=_text_part(""),
                )
            )
        elif kind == "reasoning":
            out.append(
                self._ev(
                    "response.reasoning_summary_part.added",
                    item_id=item["id"],
                    output_index=index,
                    summary_index=0,
                    part={"type": "summary_text", "text": ""},
                )
            )
        return out

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        index = len(self.items) - 1
        item, text = self.items[index], self.buffer
        self.open, self.buffer = None, ""
        ids = {"item_id": item["id"], "output_index": index}
        out: list[str] = []
        if item["type"] == "message":
            done = _message_item(item["id"], text)
            out += [
                self._ev("response.output_text.done", **ids, content_index=0, text=text, logprobs=[]),
                self._ev("response.content_part.done", **ids, content_index=0, part=_text_part(text)),
            ]
        elif item["type"] == "reasoning":
            done = _reasoning_item(item["id"], text)
            part = {"type": "summary_text", "text": text}
            out += [
                self._ev("response.reasoning_summary_text.done", **ids, summary_index=0, text=text),
                self._ev("response.reasoning_summary_part.done", **ids, summary_index=0, part=part),
            ]
        else:
            done = _call_item(item["id"], item["call_id"], item["name"], text)
            out.append(
                self._ev("response.function_call_arguments.done", **ids, name=item["name"], arguments=text)
            )
        self.items[index] = done
        out.append(self._ev("response.output_item.done", output_index=index, item=done))
        return out

    def delta(self, delta: Delta) -> list[str]:
        if isinstance(delta, TextDelta):
            out = (
                [] if self.open == "text" else self._add("text", _message_item(_id("msg"), "", "in_progress"))
            )
            self.buffer += delta.text
            item = self.items[-1]
            return [
                *out,
                self._ev(
                    "response.output_text.delta",
                    item_id=item["id"],
                    output_index=len(self.items) - 1,
                    content_index=0,
                    delta=delta.text,
                    logprobs=[],
                ),
            ]
        if isinstance(delta, ReasoningDelta):
            out = [] if self.open == "reasoning" else self._add("reasoning", _reasoning_item(_id("rs"), None))
            self.buffer += delta.text
            item = self.items[-1]
            return [
                *out,
                self._ev(
                    "response.reasoning_summary_text.delta",
                    item_id=item["id"],
                    output_index=len(self.items) - 1,
                    summary_index=0,
                    delta=delta.text,
                ),
            ]
        if isinstance(delta, ToolCallDelta):
            key = f"tool:{delta.index}"
            out: list[str] = []
            if self.open != key:
                item = _call_item(_id("fc"), delta.id or _id("call"), delta.name or "", "", "in_progress")
                out = self._add(key, item)
            index = len(self.items) - 1
            if delta.arguments:
                self.buffer += delta.arguments
                out.append(
                    self._ev(
                        "response.function_call_arguments.delta",
                        item_id=self.items[index]["id"],
                        output_index=index,
                        delta=delta.arguments,
                    )
                )
            return out
        return []  # pings and the like: nothing on this wire

    def end(self, resp: ModelResponse) -> list[str]:
        out = self._close()
        if not self.items:  # an empty answer is still one message item, as in a whole reply
            out += self._add("text", _message_item(_id("msg"), "", "in_progress")) + self._close()
        final = self.wire.finish(self.parsed, self.rid, resp, list(self.items))
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return [*out, self._ev(kind, response=final)]

    def fail(self, kind: str, message: str) -> list[str]:
        failed = self._response("failed")
        failed["error"] = {"code": "server_error" if kind == "api_error" else kind, "message": message}
        return [self._ev("response.failed", response=failed)]
