"""The OpenAI Responses API (`POST /v1/responses`) as a translation to and from chat completions, for
`advisor serve` and for `advisor proxy` (which imports it: one translation, both servers).

`to_chat` turns a Responses body (`input` as a string or items: `message` with `input_text` /
`input_image` parts, `function_call`, `function_call_output`, `reasoning` passed back; `instructions`,
function `tools`, `tool_choice`, `max_output_tokens`, `reasoning.effort`, ...) and the stored
conversation of its `previous_response_id` into a chat-completions body. Bad input raises
`ResponsesError` naming the field (`input[2].call_id: ...`), which each server answers with a 400.

`output_items` and `ResponseStream` make the reply: the `response` object's output items from a chat
message, and its server-sent events (`response.created` ... `response.completed`, each with its
`sequence_number`) from text, reasoning and tool-call deltas, as the official `openai` SDK parses them.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
_CHAT_EFFORT = {
    "none": None,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
}
LEFT_OUT = ("web_search", "web_search_preview")  # hosted tools a client offers by default (Codex)
_warned: set[str] = set()
log = logging.getLogger("advisor.responses")
REFUSED = ("background", "conversation", "prompt")  # server-side state neither server keeps


class ResponsesError(ValueError):
    """Bad Responses input; the message starts with the field it names."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(12).hex()}"


class ResponseStore:
    """The conversations (chat messages, instructions excluded) of the last `size` stored responses,
    for `previous_response_id`; least recently used first out. Thread-safe."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, list[dict]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, response_id: Any) -> list[dict] | None:
        if not isinstance(response_id, str):
            return None
        with self._lock:
            found = self._items.get(response_id)
            if found is not None:
                self._items.move_to_end(response_id)
            return found

    def put(self, response_id: str, messages: list[dict]) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[response_id] = messages
            self._items.move_to_end(response_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def history(self, body: dict) -> list[dict]:
        """The stored conversation `body` continues (none without previous_response_id)."""
        previous = body.get("previous_response_id")
        if previous is None:
            return []
        found = self.get(previous)
        if found is None:
            raise ResponsesError(
                "previous_response_id",
                f"no response {previous!r} in this server's store (it keeps the last {self.size} stored "
                "responses, in memory); send the whole conversation as input instead",
            )
        return found


# -- the request ---------------------------------------------------------------------------------
def _parts(content: Any, where: str, allowed: tuple[str, ...]) -> str | list[dict]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ResponsesError(f"{where}.content", "must be a string or a list of content parts")
    parts: list[dict] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed:
            raise ResponsesError(
                f"{where}.content[{j}].type",
                f"unsupported content part {kind!r} (here: {', '.join(allowed)})",
            )
        if kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url.startswith("data:"):
                raise ResponsesError(
                    f"{where}.content[{j}].image_url",
                    "send the image as a base64 data URL (nothing is fetched)",
                )
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "refusal":
            parts.append({"type": "text", "text": str(part.get("refusal") or "")})
        else:
            parts.append({"type": "text", "text": str(part.get("text") or "")})
    return parts


def _text(content: str | list[dict]) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def to_messages(raw: Any, history: list[dict]) -> list[dict]:
    """`input` after the stored `history`, as chat-completions messages: a function_call joins the
    assistant turn before it, a reasoning item passed back becomes the next assistant turn's
    `reasoning_content`, each function_call_output must answer a call made before it."""
    out = copy.deepcopy(history)  # the stored conversation stays as it was
    if isinstance(raw, str):
        return [*out, {"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise ResponsesError("input", "must be a string or a non-empty list of items")
    calls = {c["id"] for m in history for c in m.get("tool_calls") or []}
    reasoning: list[str] = []

    def assistant() -> dict:
        if out and out[-1]["role"] == "assistant":
            return out[-1]
        out.append({"role": "assistant", "content": None})
        return out[-1]

    def take_reasoning(msg: dict) -> None:
        if reasoning:
            msg["reasoning_content"] = (msg.get("reasoning_content") or "") + "\n".join(reasoning)
            reasoning.clear()

    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ResponsesError(where, "must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role in ("system", "developer"):
                out.append({"role": "system", "content": _parts(item.get("content"), where, ("input_text",))})
            elif role == "user":
                content = _parts(item.get("content"), where, ("input_text", "input_image"))
                out.append({"role": "user", "content": content})
            elif role == "assistant":
                text = _text(_parts(item.get("content"), where, ("output_text", "refusal", "input_text")))
                last = out[-1] if out else None
                if last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
                    last["content"] = (last.get("content") or "") + text
                    msg = last
                else:
                    msg = {"role": "assistant", "content": text}
                    out.append(msg)
                take_reasoning(msg)
            else:
                raise ResponsesError(
                    f"{where}.role", f"unknown role {role!r} (user, assistant, system, developer)"
                )
        elif kind == "function_call":
            call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments", "{}")
            if not isinstance(call_id, str) or not call_id:
                raise ResponsesError(f"{where}.call_id", "a function_call needs its call_id")
            if not isinstance(name, str) or not name:
                raise ResponsesError(f"{where}.name", "a function_call needs the function's name")
            if not isinstance(args, str):
                raise ResponsesError(f"{where}.arguments", "must be a string of JSON")
            msg = assistant()
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            msg.setdefault("tool_calls", []).append(call)
            take_reasoning(msg)
            calls.add(call_id)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if call_id not in calls:
                raise ResponsesError(
                    f"{where}.call_id", f"no function_call with call_id {call_id!r} precedes this output"
                )
            output = item.get("output")
            content = _parts(output, where, ("input_text", "input_image")) if output else ""
            out.append({"role": "tool", "tool_call_id": call_id, "content": content})
        elif kind == "reasoning":
            summary = item.get("summary") or []
            if not isinstance(summary, list):
                raise ResponsesError(f"{where}.summary", "must be a list of summary_text parts")
            text = "\n".join(
                str(s.get("text") or "") for s in summary if isinstance(s, dict) and s.get("text")
            )
            if text:
                reasoning.append(text)
        else:
            raise ResponsesError(
                f"{where}.type", f"unknown item type {kind!r} (accepted: {', '.join(ITEM_TYPES)})"
            )
    return out


def _function(t: dict, where: str) -> dict:
    fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ResponsesError(f"{where}.name", "a function tool needs a name")
    return {"type": "function", "function": fn}


def _tools(raw: Any) -> list[dict] | None:
    """Function tools, and those inside a `namespace` (Codex groups some so), as chat tools. The hosted
    web search Codex offers by default is left out (a warning line, once per process): no server here
    searches; any other hosted tool is refused, naming it."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise ResponsesError("tools", "must be a list")
    out = []
    for i, t in enumerate(raw):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind == "function":
            out.append(_function(t, f"tools[{i}]"))
        elif kind == "namespace" and isinstance(t.get("tools"), list):
            for j, inner in enumerate(t["tools"]):
                where = f"tools[{i}].tools[{j}]"
                if not isinstance(inner, dict) or inner.get("type") != "function":
                    raise ResponsesError(f"{where}.type", "a namespace may hold function tools only")
                out.append(_function(inner, where))
        elif kind in LEFT_OUT:
            if kind not in _warned:
                _warned.add(kind)
                log.warning("Responses API: %r tools are left out (no server here runs them)", kind)
        else:
            raise ResponsesError(
                f"tools[{i}].type", f"{kind!r} tools are not served here (function tools only)"
            )
    return out or None


def _tool_choice(choice: Any) -> Any:
    if choice in (None, "auto", "none", "required"):
        return choice
    if isinstance(choice, dict):
        if choice.get("type") == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        if choice.get("type") == "allowed_tools" and choice.get("mode", "auto") in ("auto", "required"):
            return choice.get("mode", "auto")
    raise ResponsesError("tool_choice", f"unsupported value {choice!r}")


def to_chat(body: Any, history: list[dict]) -> tuple[dict, list[dict]]:
    """A Responses body -> (the chat-completions body, the conversation to store: `history`, the input,
    no instructions). Raises ResponsesError naming the field."""
    if not isinstance(body, dict):
        raise ResponsesError("body", "the request body must be a JSON object")
    for name in REFUSED:
        if body.get(name):
            raise ResponsesError(name, "not served here (send the conversation as input)")
    conversation = to_messages(body.get("input"), history)
    chat: dict[str, Any] = {"model": body.get("model"), "messages": list(conversation)}
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ResponsesError("instructions", "must be a string")
    if instructions:
        chat["messages"].insert(0, {"role": "system", "content": instructions})
    reasoning = body.get("reasoning")
    if reasoning is not None:
        effort = reasoning.get("effort") if isinstance(reasoning, dict) else "?"
        if effort is not None and effort not in EFFORTS:
            raise ResponsesError("reasoning.effort", f"must be one of {', '.join(EFFORTS)} (got {effort!r})")
        if _CHAT_EFFORT.get(effort):
            chat["reasoning_effort"] = _CHAT_EFFORT[effort]
    text = body.get("text")
    if text is not None:
        fmt = text.get("format") if isinstance(text, dict) else "?"
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        if kind not in (None, "text"):
            raise ResponsesError("text.format.type", f"{kind!r} is not supported here (only text)")
    include = body.get("include")
    if include is not None and not (isinstance(include, list) and all(isinstance(x, str) for x in include)):
        raise ResponsesError("include", "must be a list of strings")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ResponsesError("metadata", "must be an object of strings")
    if not isinstance(body.get("store", True), bool):
        raise ResponsesError("store", f"must be true or false (got {body.get('store')!r})")
    cap = body.get("max_output_tokens")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
        raise ResponsesError("max_output_tokens", f"must be a positive integer (got {cap!r})")
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    choice = _tool_choice(body.get("tool_choice"))
    if choice is not None:
        chat["tool_choice"] = choice
    for src, dst in (
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("parallel_tool_calls", "parallel_tool_calls"),
        ("stream", "stream"),
    ):
        if body.get(src) is not None:
            chat[dst] = body[src]
    if body.get("stream"):
        chat["stream_options"] = {"include_usage": True}
    return chat, conversation


# -- the reply -----------------------------------------------------------------------------------
def usage(prompt: int, cached: int, completion: int, reasoning: int) -> dict:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def usage_of_chat(u: dict | None) -> dict | None:
    """A chat completion's usage in the Responses shape."""
    if not u:
        return None
    return usage(
        u.get("prompt_tokens", 0),
        (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        u.get("completion_tokens", 0),
        (u.get("completion_tokens_details") or {}).get("reasoning_tokens", 0),
    )


def response_object(body: dict, response_id: str, model: str, status: str) -> dict:
    """The `response` object of `body`, with no output yet."""
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
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
        "model": model,
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": tools,
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def finished(response: dict, output: list[dict], finish_reason: str | None, usage_: dict | None) -> dict:
    """`response` completed (or incomplete, for a cut answer) with its output and usage."""
    status, details = "completed", None
    if finish_reason == "length":
        status, details = "incomplete", {"reason": "max_output_tokens"}
    elif finish_reason == "content_filter":
        status, details = "incomplete", {"reason": "content_filter"}
    return {**response, "status": status, "incomplete_details": details, "output": output, "usage": usage_}


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    content = [text_part(text)] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def reasoning_item(item_id: str, text: str | None) -> dict:
    summary = [{"type": "summary_text", "text": text}] if text else []
    return {"type": "reasoning", "id": item_id, "summary": summary, "status": "completed"}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(message: dict) -> list[dict]:
    """A chat-completions assistant message as output items: its reasoning, its text, its calls."""
    out: list[dict] = []
    reasoning = message.get("reasoning_content")
    if reasoning:
        out.append(reasoning_item(new_id("rs"), reasoning))
    text = message.get("content") or ""
    calls = message.get("tool_calls") or []
    if text or not calls:
        out.append(message_item(new_id("msg"), text))
    for c in calls:
        fn = c.get("function") or {}
        out.append(
            call_item(
                new_id("fc"), c.get("id") or new_id("call"), fn.get("name", ""), fn.get("arguments", "")
            )
        )
    return out


def stored_turn(output: list[dict]) -> dict:
    """The output items as the chat assistant message a later previous_response_id continues from."""
    msg: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if item["type"] == "message":
            msg["content"] += "".join(p.get("text", "") for p in item["content"])
        elif item["type"] == "reasoning":
            msg["reasoning_content"] = "".join(s["text"] for s in item["summary"])
        elif item["type"] == "function_call":
            call = {"name": item["name"], "arguments": item["arguments"]}
            msg.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function", "function": call}
            )
    if msg.get("tool_calls") and not msg["content"]:
        msg["content"] = None
    return msg


class ResponseStream:
    """One response's events, as dicts: `start()`, then `text` / `reasoning` / `call` deltas (an item
    is opened at its first delta and closed when another starts), then `end(final)` or `fail(...)`."""

    def __init__(self, response: dict):
        self.response = response  # the in-progress response object
        self.seq = 0
        self.items: list[dict] = []
        self.open: str | None = None  # "text", "reasoning" or "call:<key>"
        self.buffer = ""

    def _ev(self, kind: str, **data: Any) -> dict:
        event = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return event

    def start(self) -> list[dict]:
        return [
            self._ev("response.created", response=self.response),
            self._ev("response.in_progress", response=self.response),
        ]

    def _ids(self) -> dict:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    def _add(self, key: str, item: dict) -> list[dict]:
        out = self.close()
        self.open, self.buffer = key, ""
        self.items.append(item)
        out.append(self._ev("response.output_item.added", output_index=len(self.items) - 1, item=item))
        if item["type"] == "message":
            out.append(
                self._ev("response.content_part.added", **self._ids(), content_index=0, part=text_part(""))
            )
        elif item["type"] == "reasoning":
            part = {"type": "summary_text", "text": ""}
            out.append(
                self._ev("response.reasoning_summary_part.added", **self._ids(), summary_index=0, part=part)
            )
        return out

    def close(self) -> list[dict]:
        """Closes the open item (its done events); nothing when none is open."""
        if self.open is None:
            return []
        item, text, ids = self.items[-1], self.buffer, self._ids()
        self.open, self.buffer = None, ""
        out: list[dict] = []
        if item["type"] == "message":
            done = message_item(item["id"], text)
            out += [
                self._ev("response.output_text.done", **ids, content_index=0, text=text, logprobs=[]),
                self._ev("response.content_part.done", **ids, content_index=0, part=text_part(text)),
            ]
        elif item["type"] == "reasoning":
            done = reasoning_item(item["id"], text)
            part = {"type": "summary_text", "text": text}
            out += [
                self._ev("response.reasoning_summary_text.done", **ids, summary_index=0, text=text),
                self._ev("response.reasoning_summary_part.done", **ids, summary_index=0, part=part),
            ]
        else:
            done = call_item(item["id"], item["call_id"], item["name"], text)
            out.append(
                self._ev("response.function_call_arguments.done", **ids, name=item["name"], arguments=text)
            )
        self.items[-1] = done
        out.append(self._ev("response.output_item.done", output_index=ids["output_index"], item=done))
        return out

    def text(self, delta: str) -> list[dict]:
        out = [] if self.open == "text" else self._add("text", message_item(new_id("msg"), "", "in_progress"))
        self.buffer += delta
        return [
            *out,
            self._ev("response.output_text.delta", **self._ids(), content_index=0, delta=delta, logprobs=[]),
        ]

    def reasoning(self, delta: str) -> list[dict]:
        out = [] if self.open == "reasoning" else self._add("reasoning", reasoning_item(new_id("rs"), None))
        self.buffer += delta
        return [
            *out,
            self._ev("response.reasoning_summary_text.delta", **self._ids(), summary_index=0, delta=delta),
        ]

    def call(self, key: Any, call_id: str | None, name: str | None, arguments: str) -> list[dict]:
        """A tool call's delta: its first (with its id and name) opens its item."""
        out: list[dict] = []
        if self.open != f"call:{key}":
            item = call_item(new_id("fc"), call_id or new_id("call"), name or "", "", "in_progress")
            out = self._add(f"call:{key}", item)
        if arguments:
            self.buffer += arguments
            out.append(self._ev("response.function_call_arguments.delta", **self._ids(), delta=arguments))
        return out

    def end(self, finish_reason: str | None, usage_: dict | None) -> tuple[list[dict], dict]:
        """The closing events and the final response object (completed or incomplete)."""
        out = self.close()
        if not self.items:  # an empty answer is still one message item, as in a whole reply
            out += self._add("text", message_item(new_id("msg"), "", "in_progress")) + self.close()
        final = finished(self.response, list(self.items), finish_reason, usage_)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return [*out, self._ev(kind, response=final)], final

    def fail(self, code: str, message: str) -> list[dict]:
        failed = {**self.response, "status": "failed", "error": {"code": code, "message": message}}
        return [self._ev("response.failed", response=failed)]
