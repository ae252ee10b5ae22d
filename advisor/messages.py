"""Provider-neutral chat messages: what the loop builds and every endpoint translates.

Endpoints convert these to their wire format (OpenAI chat, Anthropic Messages, the Step chat
template for the embedded engine) and back; nothing else in `advisor/` knows a wire format. The content
parts (`TextPart`, `ImagePart`) come from `advisor.tools.content`, below both, since tools make them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from advisor.tools.content import ImagePart, Part, TextPart

__all__ = [
    "Attempt",
    "Effort",
    "ImagePart",
    "Message",
    "ModelResponse",
    "Part",
    "Role",
    "TextPart",
    "ToolCall",
    "Usage",
    "without_images",
]

Role = Literal["system", "user", "assistant", "tool"]
Effort = Literal["low", "medium", "high"]


@dataclass
class ToolCall:
    """A tool call as the model emitted it.

    `arguments` is None when the model's arguments could not be parsed; `parse_error` then says why,
    and the loop counts the step as failed without running anything.
    """

    id: str
    name: str
    arguments: dict | None
    raw_arguments: str = ""
    parse_error: str | None = None


@dataclass
class Message:
    role: Role
    content: list[Part] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None  # for role == "tool"
    name: str | None = None  # the tool's name, for role == "tool"
    reasoning: str | None = None  # assistant reasoning text, when the provider returns it
    is_error: bool = False  # for role == "tool": the tool failed

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.content if isinstance(p, ImagePart)]

    @classmethod
    def system(cls, text: str) -> Message:
        return cls("system", [TextPart(text)])

    @classmethod
    def user(cls, text: str = "", images: list[ImagePart] | None = None) -> Message:
        parts: list[Part] = [TextPart(text)] if text else []
        return cls("user", parts + list(images or []))

    @classmethod
    def assistant(
        cls, text: str = "", tool_calls: list[ToolCall] | None = None, reasoning: str | None = None
    ) -> Message:
        return cls("assistant", [TextPart(text)] if text else [], list(tool_calls or []), reasoning=reasoning)

    @classmethod
    def tool(cls, tool_call_id: str, name: str, text: str, is_error: bool = False) -> Message:
        return cls("tool", [TextPart(text)], tool_call_id=tool_call_id, name=name, is_error=is_error)


def without_images(messages: list[Message]) -> list[Message]:
    """The messages as a text-only model gets them: image parts dropped, the text that names them kept."""
    return [
        replace(m, content=[p for p in m.content if not isinstance(p, ImagePart)]) if m.images else m
        for m in messages
    ]


@dataclass
class Usage:
    """Token counts of one model call, split so that each count has exactly one price.

    input: prompt tokens billed at the full input price (cache misses only).
    cached_input: prompt tokens read from the provider's cache.
    cache_write: prompt tokens written to the cache (Anthropic bills these apart; 0 elsewhere).
    output: visible completion tokens, reasoning excluded.
    reasoning: reasoning/thinking tokens (billed at the output price unless the price says otherwise).
    estimated: True when the provider sent no usage and the counts were estimated from text length.
    """

    input: int = 0
    cached_input: int = 0
    cache_write: int = 0
    output: int = 0
    reasoning: int = 0
    estimated: bool = False

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input + other.input,
            self.cached_input + other.cached_input,
            self.cache_write + other.cache_write,
            self.output + other.output,
            self.reasoning + other.reasoning,
            self.estimated or other.estimated,
        )

    def as_dict(self) -> dict:
        return {
            "input": self.input,
            "cached_input": self.cached_input,
            "cache_write": self.cache_write,
            "output": self.output,
            "reasoning": self.reasoning,
            "estimated": self.estimated,
        }


@dataclass
class Attempt:
    """One HTTP (or engine) attempt inside a call; every attempt goes into the trace."""

    number: int
    ok: bool
    status: int | None = None  # HTTP status when there was a response
    error: str | None = None  # one line, never containing a secret
    retry_after_s: float | None = None
    latency_s: float = 0.0
    usage: Usage | None = None  # tokens billed for this attempt, when the provider reported any


@dataclass
class ModelResponse:
    message: Message  # role == "assistant"
    usage: Usage
    model: str = ""
    finish_reason: str | None = None
    latency_s: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
