"""The advisor tool served for any model pair: Anthropic's `advisor_20260301` server tool (and the
OpenAI-wire `advisor` / `openrouter:advisor` tool) on `advisor proxy`.

A request that offers it is served by a loop (`advised`): the executor upstream gets a function tool
`advisor` with no parameters; when it calls it, the consult core (`advisor.consult`, trigger `tool`)
asks the advisor endpoint (`advisor_models:` in proxy.yaml maps the tool's `model`; default: the
frontier role) on the conversation so far, and the executor is called again with the advice as the
call's result, until it ends its turn. The client gets one reply: the executor's blocks, a
`server_tool_use` block and an `advisor_tool_result` block per consult, the continuation, and
`usage.iterations` (each executor call a `message`, each advisor call an `advisor_message`).

The loop yields what a streamed reply sends, in order: the executor's deltas (its `advisor` call's own
deltas held back), `AdvisorCall` once the executor's turn asked for advice, `Ping`s while the advisor
runs, `AdvisorResult` with the whole result, `IterationEnd` after each executor call, and last a
`StreamEnd` whose response is an `AdvisedResponse`. A non-streamed reply is built from the same events.

Earlier turns sent back by the client (`server_tool_use` + `advisor_tool_result` blocks in an assistant
message) are unfolded into the call and its result (`unfold_server_blocks`) so the upstream sees them
as a tool call and its output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from advisor.consult import ADVISOR_TOOL
from advisor.messages import ModelResponse, Usage

ANTHROPIC_TYPE = "advisor_20260301"
OPENAI_TYPES = ("advisor", "openrouter:advisor")
# Anthropic's error codes of an advisor_tool_result_error
MAX_USES = "max_uses_exceeded"
TOO_MANY = "too_many_requests"
OVERLOADED = "overloaded"
TOO_LONG = "prompt_too_long"
UNAVAILABLE = "unavailable"
PING_EVERY_S = 5.0  # a ping this often while the advisor runs (proxies drop idle streams)


@dataclass(frozen=True)
class AdvisorToolSpec:
    """The advisor tool as a request offered it."""

    model: str | None = None  # the advisor model asked for; advisor_models maps it to an endpoint
    max_uses: int | None = None  # per request; None: only max_consults and the budget limit it
    max_tokens: int | None = None  # the advice's cap; None: the escalation's advice_max_tokens


def _positive(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: must be a positive integer (got {value!r})")
    return value


def parse_anthropic_tool(t: dict, where: str) -> AdvisorToolSpec:
    name = t.get("name", ADVISOR_TOOL)
    if name != ADVISOR_TOOL:
        raise ValueError(f"{where}.name: the advisor tool is named 'advisor' (got {name!r})")
    model = t.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError(f"{where}.model: required (the advisor model)")
    return AdvisorToolSpec(
        model,
        _positive(t.get("max_uses"), f"{where}.max_uses"),
        _positive(t.get("max_tokens"), f"{where}.max_tokens"),
    )


def parse_openai_tool(t: dict, where: str) -> AdvisorToolSpec:
    """OpenRouter's shape: {type: openrouter:advisor, parameters: {model, max_uses, max_tokens | max_completion_tokens}};
    the fields are accepted at the top level too."""
    p = t.get("parameters") if isinstance(t.get("parameters"), dict) else t
    model = p.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"{where}.model: must be a model name")
    cap = p.get("max_completion_tokens", p.get("max_tokens"))
    return AdvisorToolSpec(
        model or None,
        _positive(p.get("max_uses"), f"{where}.max_uses"),
        _positive(cap, f"{where}.max_tokens"),
    )


def server_tool_id() -> str:
    return "srvtoolu_" + os.urandom(12).hex()


def result_text(text: str | None, error_code: str | None) -> str:
    """The tool result the executor reads (the advice, or the error saying what happened)."""
    if error_code is None:
        return text or ""
    return f"error: advisor: {error_code}; go on without the advisor's help"


def unfold_server_blocks(messages: Any) -> Any:
    """An Anthropic request's messages with each assistant turn's `server_tool_use` (advisor) and
    `advisor_tool_result` blocks as a `tool_use` block ending the turn, a user turn with its
    `tool_result`, and the turn's remaining blocks as a new assistant turn (other server tools' blocks
    are dropped: they were never the upstream's)."""
    if not isinstance(messages, list):
        return messages
    out: list = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if (
            m is None
            or not isinstance(m, dict)
            or m.get("role") != "assistant"
            or not isinstance(content, list)
        ):
            out.append(m)
            continue
        if not any(
            isinstance(b, dict) and b.get("type") in ("server_tool_use", "advisor_tool_result")
            for b in content
        ):
            out.append(m)
            continue
        blocks: list = []
        for b in content:
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "server_tool_use" and b.get("name") == ADVISOR_TOOL:
                blocks.append({"type": "tool_use", "id": b.get("id", ""), "name": ADVISOR_TOOL, "input": {}})
            elif kind == "advisor_tool_result":
                out.append({"role": "assistant", "content": blocks or [{"type": "text", "text": ""}]})
                inner = b.get("content") if isinstance(b.get("content"), dict) else {}
                if inner.get("type") == "advisor_result":
                    text, error = str(inner.get("text") or ""), None
                elif inner.get("type") == "advisor_redacted_result":
                    text, error = "(the advisor's advice is redacted)", None
                else:
                    text, error = None, str(inner.get("error_code") or UNAVAILABLE)
                result = {
                    "type": "tool_result",
                    "tool_use_id": b.get("tool_use_id", ""),
                    "content": result_text(text, error),
                }
                if error is not None:
                    result["is_error"] = True
                out.append({"role": "user", "content": [result]})
                blocks = []
            elif kind in ("server_tool_use", "web_search_tool_result", "web_fetch_tool_result"):
                continue
            else:
                blocks.append(b)
        if blocks:
            out.append({"role": "assistant", "content": blocks})
    # an unfolded turn followed by the client's next assistant turn or a user turn is valid as is; two
    # user turns in a row (a result, then the client's message) merge into one
    merged: list = []
    for m in out:
        if (
            merged
            and isinstance(m, dict)
            and isinstance(merged[-1], dict)
            and m.get("role") == "user"
            and merged[-1].get("role") == "user"
        ):
            prev = merged[-1]["content"]
            nxt = m.get("content")
            nxt = [{"type": "text", "text": nxt}] if isinstance(nxt, str) else list(nxt or [])
            merged[-1] = {"role": "user", "content": [*prev, *nxt]}
        else:
            merged.append(m)
    return merged


# -- what the loop yields besides the executor's deltas -----------------------------------------
@dataclass
class AdvisorCall:
    id: str  # srvtoolu_...


@dataclass
class AdvisorResult:
    id: str
    text: str | None = None  # the advice
    error_code: str | None = None


@dataclass
class Ping:
    pass


@dataclass
class IterationEnd:
    """An executor call ended (its text and tool calls other than `advisor` are the reply's content)."""

    response: ModelResponse
    advisor_call: str | None  # the srvtoolu_ id when this call asked for advice


@dataclass
class Iteration:
    kind: str  # message | advisor_message
    usage: Usage
    model: str


@dataclass
class AdvisedResponse(ModelResponse):
    """The executor's last response, with the whole turn: `segments` in order (an executor
    `IterationEnd`, an `AdvisorCall`, an `AdvisorResult`, ...) and the usage of each call."""

    segments: list = field(default_factory=list)
    iterations: list[Iteration] = field(default_factory=list)

    @property
    def executor_usage(self) -> Usage:
        total = Usage()
        for it in self.iterations:
            if it.kind == "message":
                total = total + it.usage
        return total
