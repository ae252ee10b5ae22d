"""What a ScriptedServer answers, independent of the wire format: the scripted turns (`Reply`,
`HTTPError`, `Delay`, a str, a callable), their usage, and the requests it recorded.

The wire modules (`advisor.testing.openai`, `advisor.testing.anthropic`) render a resolved turn in
their provider's JSON; `advisor.testing.server` serves the scripts over HTTP.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response


@dataclass
class ScriptedUsage:
    """Token counts of a scripted reply, in OpenAI terms (totals include the details).

    prompt_tokens: all prompt tokens, cached ones included.
    cached_tokens: prompt tokens read from cache (OpenAI prompt_tokens_details.cached_tokens,
        Anthropic cache_read_input_tokens).
    cache_write_tokens: prompt tokens written to cache (Anthropic cache_creation_input_tokens only).
    completion_tokens: all completion tokens, reasoning included.
    reasoning_tokens: OpenAI completion_tokens_details.reasoning_tokens (Anthropic has no such split).
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0

    def openai(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }

    def anthropic(self) -> dict:
        return {
            "input_tokens": max(0, self.prompt_tokens - self.cached_tokens - self.cache_write_tokens),
            "cache_read_input_tokens": self.cached_tokens,
            "cache_creation_input_tokens": self.cache_write_tokens,
            "output_tokens": self.completion_tokens,
        }


@dataclass
class ScriptedToolCall:
    name: str
    arguments: dict | str = field(default_factory=dict)
    id: str | None = None  # generated (call_N) when None


def _default_usage() -> ScriptedUsage:
    return ScriptedUsage(prompt_tokens=100, completion_tokens=20)


@dataclass
class Reply:
    text: str | None = None
    tool_calls: list[ScriptedToolCall] = field(default_factory=list)
    reasoning: str | None = None  # OpenAI: message.reasoning_content; Anthropic: a thinking block
    usage: ScriptedUsage | None = field(default_factory=_default_usage)  # None: no usage in the response
    finish_reason: str | None = None  # default: "tool_calls" when there are tool calls, else "stop"
    delay_s: float = 0.0
    # streamed replies only (a request with stream: true):
    chunk_delay_s: float = 0.0  # the wait before each event after the first
    hold: threading.Event | None = None  # after the first delta, wait for this to be set (at most hold_s)
    hold_s: float = 10.0  # a hold not set in time cuts the stream off there (the test then fails)
    cut_after: int | None = None  # end the stream after this many deltas, unfinished (a broken stream)

    @property
    def finish(self) -> str:
        """The finish reason sent, in OpenAI terms (the Anthropic wire maps it to a stop_reason)."""
        return self.finish_reason or ("tool_calls" if self.tool_calls else "stop")


@dataclass
class HTTPError:
    status: int
    message: str = ""
    retry_after: float | str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


@dataclass
class Delay:
    seconds: float
    then: Any = None  # a turn answered after the delay; None -> HTTP 504


Turn = Reply | HTTPError | Delay | str | Callable[[dict], Any]
Script = list[Turn] | Callable[[dict], Any]


@dataclass(frozen=True)
class StreamEvent:
    """One server-sent event of a streamed reply; `delta` marks the ones carrying text, reasoning or a
    tool call's start or arguments (what `Reply.hold` and `cut_after` count)."""

    text: str
    delta: bool = False


@dataclass(frozen=True)
class WireFormat:
    """One provider's wire format, as the server needs it: the route it answers on, an optional check
    that refuses a request before it consumes a turn, and how an error, a reply and a streamed reply are
    rendered (`reply(turn, body, n)`: `n` numbers the response, for its ids; `stream(turn, body, n)`:
    the events, which the server paces)."""

    path: str
    error: Callable[[HTTPError], Response]
    reply: Callable[[Reply, dict, int], Response]
    stream: Callable[[Reply, dict, int], list[StreamEvent]]
    refuse: Callable[[dict], HTTPError | None] = lambda body: None


@dataclass
class RecordedRequest:
    """One request the server received. Secret headers are redacted; see `auth_is`."""

    path: str
    model: str | None
    body: Any
    headers: dict[str, str]
    auth_sha256: str | None = None  # SHA-256 of the Authorization / x-api-key value, when one was sent
    time: float = 0.0
    # a streamed reply: "complete", "cut" (cut_after, or a hold not set in time), or "client left"
    # (the client closed the connection before the end); None while streaming and for other replies
    stream_outcome: str | None = None
    deltas_sent: int = 0

    @property
    def has_auth(self) -> bool:
        return self.auth_sha256 is not None

    def auth_is(self, key: str) -> bool:
        """True when the credential sent was `key` (as `Bearer key` or a bare x-api-key)."""
        if self.auth_sha256 is None:
            return False
        return self.auth_sha256 in (sha256_hex(key), sha256_hex(f"Bearer {key}"))


def sha256_hex(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()
