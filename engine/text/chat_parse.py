"""Parse Step model output into reasoning, content and tool calls, whole or incrementally.

The output follows a prompt that ends in `<think>\\n`, so it starts inside the reasoning:

    reasoning...</think>\\ncontent<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n
    </function>\\n</tool_call><|im_end|>

`StreamingParser.feed` takes text chunks cut anywhere and returns what became certain: reasoning and
content deltas, and each tool call once its `</tool_call>` arrived. Text that might be the start of a
marker, and trailing whitespace, is held back until the next chunk decides it, so the deltas of any
chunking add up to the same result as one `parse_output` call. Malformed markup becomes a `ParseError`
in `errors`, which the agent loop counts as a failed step.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
END_OF_TURN = "<|im_end|>"

_REASONING_MARKERS = (THINK_CLOSE, CALL_OPEN, END_OF_TURN)
_CONTENT_MARKERS = (CALL_OPEN, FUNCTION_OPEN, END_OF_TURN, CALL_CLOSE)
_PARAM = re.compile(r"<parameter=([^>\n]*)>(.*?)</parameter>", re.DOTALL)
_NAME = re.compile(r"[A-Za-z0-9_.:\-]+")


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `tool_calls` entry (arguments as a JSON string)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclass
class ParseError:
    message: str
    raw: str  # the offending markup, as generated

    def __str__(self) -> str:
        return self.message


@dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ParseError] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls or self.errors)


@dataclass
class ParsedOutput:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ParseError] = field(default_factory=list)
    ended: bool = False  # an end-of-turn token was seen

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_message(self) -> dict[str, Any]:
        """The OpenAI-style assistant message (what goes back into the history for the next turn)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


class _Channel:
    """Concatenation-invariant text sink: drops leading whitespace, holds trailing whitespace until
    more text follows (so a segment that ends before a marker or the end loses its trailing blanks)."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""
        self.emitted = False

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        combined = self.pending + text
        body = combined.rstrip()
        self.pending = combined[len(body) :]
        if body:
            self.emitted = True
        return body

    def cut(self) -> None:
        """A segment ends (marker or end): drop held whitespace; the next segment starts a new line."""
        self.pending = "\n" if self.emitted else ""
        self.started = False

    def resume(self, text: str) -> str:
        # After a cut, text restarts stripped and is joined to earlier text by one newline.
        if not self.started:
            stripped = text.lstrip()
            if not stripped:
                return ""
            sep, self.pending = self.pending, ""
            self.started = True
            return sep + self.push(stripped)
        return self.push(text)


def held_suffix(buf: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of buf that is a proper prefix of some marker: what a streaming
    reader holds back while it could still become one (markers here, stop strings in serving)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(buf)), best, -1):
            if buf.endswith(m[:n]):
                best = n
                break
    return best


def _find_first(buf: str, markers: Sequence[str]) -> tuple[int, str]:
    hits = [(buf.find(m), m) for m in markers]
    hits = [h for h in hits if h[0] >= 0]
    return min(hits) if hits else (-1, "")


class StreamingParser:
    """Incremental parser; `feed(chunk)` -> ChatDelta, `finish()` -> the last ChatDelta.

    `tools`: the OpenAI function schemas offered in the prompt; they type parameter values and let
    calls to unknown functions be reported. `in_reasoning`: the prompt ended inside `<think>`.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None, *, in_reasoning: bool = True):
        self._schemas = _schemas(tools)
        self._has_tools = tools is not None and len(tools) > 0
        self._mode = "start"
        self._in_reasoning = in_reasoning
        self._buf = ""
        self._reasoning = _Channel()
        self._content = _Channel()
        self._call_close = CALL_CLOSE
        self.result = ParsedOutput()

    # ------------------------------------------------------------------ driving
    def feed(self, chunk: str) -> ChatDelta:
        delta = ChatDelta()
        if self._mode == "done" or not chunk:
            return delta
        self._buf += chunk
        self._run(delta, final=False)
        self._record(delta)
        return delta

    def finish(self) -> ChatDelta:
        delta = ChatDelta()
        if self._mode != "done":
            self._run(delta, final=True)
            if self._mode == "tool":
                self._error(
                    delta, f"unclosed {self._opener()}: output ended inside a tool call", self._raw(self._buf)
                )
            self._buf = ""
            self._mode = "done"
        self._record(delta)
        return delta

    def _record(self, delta: ChatDelta) -> None:
        self.result.reasoning += delta.reasoning
        self.result.content += delta.content
        self.result.tool_calls += delta.tool_calls
        self.result.errors += delta.errors

    def _error(self, delta: ChatDelta, message: str, raw: str) -> None:
        delta.errors.append(ParseError(message, raw))

    def _run(self, delta: ChatDelta, final: bool) -> None:
        while True:
            if self._mode == "start":
                head = self._buf.lstrip()
                if not final and len(head) < len(THINK_OPEN) and THINK_OPEN.startswith(head):
                    return  # could still become "<think>"
                if head.startswith(THINK_OPEN):
                    self._buf = head[len(THINK_OPEN) :]
                    self._mode = "reasoning"
                else:
                    self._mode = "reasoning" if self._in_reasoning else "content"
            elif self._mode == "reasoning":
                if not self._step_text(delta, final, _REASONING_MARKERS, reasoning=True):
                    return
            elif self._mode == "content":
                if not self._step_text(delta, final, _CONTENT_MARKERS, reasoning=False):
                    return
            elif self._mode == "tool":
                if not self._step_tool(delta, final):
                    return
            else:
                return

    def _emit(self, delta: ChatDelta, text: str, reasoning: bool) -> None:
        if reasoning:
            delta.reasoning += self._reasoning.push(text)
        else:
            delta.content += self._content.resume(text)

    def _step_text(self, delta: ChatDelta, final: bool, markers: Sequence[str], reasoning: bool) -> bool:
        pos, marker = _find_first(self._buf, markers)
        if pos < 0:
            keep = 0 if final else held_suffix(self._buf, markers)
            text, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
            self._emit(delta, text, reasoning)
            return False
        self._emit(delta, self._buf[:pos], reasoning)
        self._buf = self._buf[pos + len(marker) :]
        if marker == CALL_CLOSE:
            return True  # a stray close tag (e.g. after a bare <function=...> block) carries nothing
        if reasoning:
            self._reasoning.cut()
        else:
            self._content.cut()
        if marker == END_OF_TURN:
            self.result.ended = True
            self._buf = ""
            self._mode = "done"
        elif marker == THINK_CLOSE:
            self._mode = "content"
        elif marker == CALL_OPEN:
            self._call_close = CALL_CLOSE
            self._mode = "tool"
        else:  # a bare <function=...> with no <tool_call> around it
            self._buf = FUNCTION_OPEN + self._buf
            self._call_close = FUNCTION_CLOSE
            self._mode = "tool"
        return True

    def _opener(self) -> str:
        return CALL_OPEN if self._call_close == CALL_CLOSE else FUNCTION_OPEN + "...>"

    def _raw(self, text: str) -> str:
        return CALL_OPEN + text if self._call_close == CALL_CLOSE else text

    def _step_tool(self, delta: ChatDelta, final: bool) -> bool:
        close = self._buf.find(self._call_close)
        # A new <tool_call> or the end of the turn before our close tag: this call was never closed.
        cut, marker = _find_first(self._buf, (CALL_OPEN, END_OF_TURN))
        if cut >= 0 and (close < 0 or cut < close):
            self._error(
                delta,
                f"unclosed {self._opener()}: {marker} came before {self._call_close}",
                self._raw(self._buf[:cut]),
            )
            self._buf = self._buf[cut:]
            self._mode = "content"
            return True
        if close < 0:
            return False
        block = self._buf[:close]
        self._buf = self._buf[close + len(self._call_close) :]
        self._mode = "content"
        if self._call_close == FUNCTION_CLOSE:
            self._error(delta, f"tool call without a {CALL_OPEN} wrapper", block + FUNCTION_CLOSE)
            return True
        call = _parse_call(block, self._schemas, self._has_tools)
        if isinstance(call, ParseError):
            delta.errors.append(call)
        else:
            delta.tool_calls.append(call)
        return True


def parse_output(
    text: str, tools: Sequence[Mapping[str, Any]] | None = None, *, in_reasoning: bool = True
) -> ParsedOutput:
    """Parse a whole completion (the text generated after the prompt)."""
    parser = StreamingParser(tools, in_reasoning=in_reasoning)
    parser.feed(text)
    parser.finish()
    return parser.result


# ------------------------------------------------------------------------------- one tool call
def _schemas(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    out = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            params = fn.get("parameters") or {}
            out[fn["name"]] = dict(params.get("properties") or {}) if isinstance(params, Mapping) else {}
    return out


def _parse_call(block: str, schemas: dict[str, dict[str, Any]], has_tools: bool) -> ToolCall | ParseError:
    raw = CALL_OPEN + block + CALL_CLOSE
    inner = block.strip()
    if not inner.startswith(FUNCTION_OPEN):
        return ParseError(f"tool call without {FUNCTION_OPEN}NAME>", raw)
    head_end = inner.find(">")
    newline = inner.find("\n")
    if head_end < 0 or (0 <= newline < head_end):
        return ParseError(f"unterminated {FUNCTION_OPEN}... tag", raw)
    name = inner[len(FUNCTION_OPEN) : head_end].strip()
    if not name:
        return ParseError("tool call with an empty function name", raw)
    if not _NAME.fullmatch(name):
        return ParseError(f"tool call with an invalid function name {name[:60]!r}", raw)
    if has_tools and name not in schemas:
        return ParseError(f"call to unknown function {name!r}", raw)
    body = inner[head_end + 1 :]
    if not body.rstrip().endswith(FUNCTION_CLOSE):
        return ParseError(f"{FUNCTION_OPEN}{name}> is not closed by {FUNCTION_CLOSE}", raw)
    body = body.rstrip()[: -len(FUNCTION_CLOSE)]
    props = schemas.get(name, {})
    args: dict[str, Any] = {}
    pos = 0
    for m in _PARAM.finditer(body):
        gap = body[pos : m.start()]
        if gap.strip():
            return ParseError(f"{name}: unexpected text {gap.strip()[:60]!r} between parameters", raw)
        key = m.group(1).strip()
        if not key:
            return ParseError(f"{name}: parameter with an empty name", raw)
        if key in args:
            return ParseError(f"{name}: parameter {key!r} given twice", raw)
        args[key] = _decode_value(_strip_one_newline(m.group(2)), props.get(key))
        pos = m.end()
    rest = body[pos:].strip()
    if rest:
        what = "unclosed <parameter=...>" if "<parameter=" in rest else f"unexpected text {rest[:60]!r}"
        return ParseError(f"{name}: {what}", raw)
    return ToolCall(name=name, arguments=args)


def _strip_one_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


_PY_LITERALS = {"True": True, "False": False, "None": None}


def _decode_value(value: str, schema: Any) -> Any:
    """Schema type string -> the raw text; other schema types (or no schema) -> JSON when it parses.

    The reference template writes non-string scalars with Python's str() (`True`, `None`), so those
    spellings decode too; lists and dicts are JSON (or Python reprs from older renderers).
    """
    types = _schema_types(schema)
    if types and types <= {"string"}:
        return value
    text = value.strip()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        pass
    if text in _PY_LITERALS and (not types or types & {"boolean", "null"}):
        return _PY_LITERALS[text]
    if types & {"object", "array"} and text[:1] in "[{":
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value
        return parsed if isinstance(parsed, (list, dict)) else value
    return value


def _schema_types(schema: Any) -> set[str]:
    if not isinstance(schema, Mapping):
        return set()
    t = schema.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    found: set[str] = set()
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            found |= _schema_types(sub)
    if "enum" in schema and not found:
        found = {"string"} if all(isinstance(v, str) for v in schema["enum"]) else set()
    return found
