"""The endpoint contract: one async `complete` call, whatever the provider."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from advisor.endpoints.stream import Delta, StreamEnd, deltas_of
from advisor.messages import Attempt, Effort, Message, ModelResponse
from advisor.pricing import Price

if TYPE_CHECKING:
    from advisor.tools.spec import ToolSpec

Provider = Literal["openai", "anthropic", "embedded"]
ToolChoice = Literal["auto", "none", "required"]


@dataclass
class ChatRequest:
    """One chat turn, as every endpoint takes it (the loop builds one per call; a proxy builds one from
    a wire request). `max_tokens` None means the endpoint config's cap.

    The sampling fields are a client's, passed through by the proxy; None leaves the provider's default.
    Each provider sends those its API takes, in its own shape (see its module docstring): `stop` goes
    as OpenAI `stop` or Anthropic `stop_sequences`; `seed` and the penalties are OpenAI-only, `top_k`
    is Anthropic's (and vLLM/SGLang's, which take it on the OpenAI route)."""

    messages: list[Message]
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    effort: Effort | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    parallel_tool_calls: bool | None = None


class EndpointConfig(BaseModel):
    """One named model endpoint, as written under `endpoints:` in task.yaml or advisor.yaml."""

    model_config = ConfigDict(extra="forbid")

    provider: Provider
    model: str = Field(
        description="model name sent to the provider, or for embedded a shipped model name or a checkpoint path"
    )
    base_url: str | None = Field(
        default=None,
        description="API root, e.g. http://127.0.0.1:8000/v1 (openai) or https://api.anthropic.com (anthropic)",
    )
    api_key_env: str | None = Field(
        default=None,
        description="name of the environment variable holding the API key; keys never appear in files",
    )
    price: Price | None = Field(
        default=None, description="USD per million tokens; required unless free: true"
    )
    free: bool = Field(
        default=False, description="mark an unpriced endpoint as deliberately free (no silent zero)"
    )
    timeout_s: float = Field(default=120.0, gt=0, description="per-attempt timeout")
    max_retries: int = Field(
        default=4, ge=0, description="retries on connection errors, timeouts, 429 and 5xx"
    )
    max_tokens: int | None = Field(default=None, gt=0, description="completion token cap sent with each call")
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="model calls in flight to this endpoint at once, across all the run's tasks (on Ray: the whole cluster)",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="extra HTTP headers (no secrets: use api_key_env)"
    )
    extra_body: dict = Field(
        default_factory=dict, description="extra JSON fields merged into each request body"
    )
    device: str | None = Field(default=None, description="embedded only: torch device (cpu, cuda)")
    vision: bool = Field(
        default=True,
        description="false for a text-only model: images are named and sized in the text but never sent; it works with them through the vision tools' text results",
    )


AttemptHook = Callable[[Attempt], None]


class Endpoint(ABC):
    """A model behind one name. Implementations live beside this file, one provider per module."""

    def __init__(self, name: str, config: EndpointConfig):
        self.name = name
        self.config = config

    async def complete(
        self, request: ChatRequest | list[Message], *, on_attempt: AttemptHook | None = None, **options
    ) -> ModelResponse:
        """Send one chat turn; retries happen inside, each attempt reported to `on_attempt`.

        `complete(messages, tools=..., effort=...)` is shorthand for `complete(ChatRequest(messages, ...))`.
        Raises `EndpointError` when the call finally fails (after retries, or at once on a 4xx
        other than 429). The error text is one line and never holds a secret.
        """
        return await self.send(_request("complete", request, options), on_attempt)

    async def stream(
        self, request: ChatRequest | list[Message], *, on_attempt: AttemptHook | None = None, **options
    ) -> AsyncIterator[Delta]:
        """Send one chat turn and yield its reply as it arrives (`advisor.endpoints.stream`): text,
        reasoning and tool-call deltas, then one `StreamEnd` holding the `ModelResponse` that `complete`
        would have returned.

        Retries happen only before the first delta; a failure after it raises `EndpointError` (its
        attempts hold the usage of what was streamed). Close the generator (`contextlib.aclosing`) to
        stop early: the upstream request is closed with it."""
        async for delta in self.send_stream(_request("stream", request, options), on_attempt):
            yield delta

    @abstractmethod
    async def send(self, request: ChatRequest, on_attempt: AttemptHook | None) -> ModelResponse:
        """What a provider implements: one chat turn for `complete`, which normalises the request."""

    async def send_stream(self, request: ChatRequest, on_attempt: AttemptHook | None) -> AsyncIterator[Delta]:
        """One streamed chat turn for `stream`. This default answers with the complete reply, as deltas
        (for a provider that cannot stream); the HTTP providers stream token by token."""
        response = await self.send(request, on_attempt)
        for delta in deltas_of(response.message):
            yield delta
        yield StreamEnd(response)

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has nothing to release."""


def _request(call: str, request: ChatRequest | list[Message], options: dict) -> ChatRequest:
    if not isinstance(request, ChatRequest):
        return ChatRequest(list(request), **options)
    if options:
        raise TypeError(f"{call}() takes a ChatRequest or messages with options, not both: {sorted(options)}")
    return request


class EndpointError(Exception):
    """A model call that failed for good. `attempts` holds every try (and its billed usage)."""

    def __init__(
        self, endpoint: str, message: str, attempts: list[Attempt] | None = None, status: int | None = None
    ):
        super().__init__(f"endpoint '{endpoint}': {message}")
        self.endpoint = endpoint
        self.attempts = attempts or []
        self.status = status
