"""One consult of the frontier, for every caller: the task loop's policy triggers, the proxy's router,
and the executor itself calling its `advisor` tool.

`consult()` is given what the frontier is told (a `ConsultBrief`: goal, tools, a digest of the work
so far, the trigger), the conversation (to price a handover), the frontier `Slot`, the conversation's
`EscalationPolicy` and `Ledger` (the consult budget: `max_consults`, and `max_usd` against what is
spent), and a `call` that sends a request to the frontier and books it where the caller keeps its
books (the task's ledger and trace, the proxy session's ledger and journal). It decides the consult
(priced before it is made), makes it when it is advice that is wanted, and returns a `Consulted`:
what happened, as data. Where the advice goes (a user note in the loop's conversation, a note the
proxy inserts into later requests, a tool result) is the caller's business.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from advisor.endpoints.base import ChatRequest, Endpoint
from advisor.escalation import ConsultOutcome, EscalationPolicy, estimate_tokens
from advisor.ledger import Ledger
from advisor.messages import Effort, Message, ModelResponse, Usage
from advisor.pricing import Price
from advisor.prompts import render
from advisor.tools.spec import ToolSpec

ADVISOR_TOOL = "advisor"
ADVISOR_TOOL_DESCRIPTION = (
    "Consult a stronger advisor model. It sees your whole work so far (no arguments needed) and answers "
    "with advice: a plan, a correction, what to check. Call it early, once you have oriented yourself and "
    "before you commit to an approach; when you are stuck or your attempts keep failing; and before you "
    "declare the task done, to check the result. Calls are limited: do not call it for routine steps."
)
DIGEST_ENTRIES = 60  # a digest built from a whole conversation keeps its last entries, not all of a long one
DIGEST_TEXT = 300  # characters of a call's arguments and of its result kept per digest entry


class _NoArguments(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _served_by_the_caller(**_: object) -> None:
    raise RuntimeError("the advisor tool is answered by a consult, never invoked as a function")


def advisor_tool_spec() -> ToolSpec:
    """The `advisor` function tool an executor is offered (no parameters): its call is a consult."""
    return ToolSpec(
        ADVISOR_TOOL,
        ADVISOR_TOOL_DESCRIPTION,
        {"type": "object", "properties": {}},
        _served_by_the_caller,
        _NoArguments,
    )


@dataclass
class Slot:
    """A model in a role: which endpoint, at what price and effort, and whose ledger line it bills.

    `pool`: instances of the endpoint that conversations are spread over (the proxy keeps each session
    on one, since an Anthropic endpoint replays the thinking blocks it received, and keeps each pool
    small); a task loop uses the one `endpoint`."""

    role: str
    endpoint: Endpoint
    price: Price
    effort: Effort | None
    pool: list[Endpoint] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pool:
            self.pool = [self.endpoint]

    def for_session(self, session_id: str) -> Endpoint:
        return self.pool[zlib.crc32(session_id.encode()) % len(self.pool)]


def digest_entry(
    name: str, arguments: object, raw_arguments: str, result: str | None, *, step: int | None = None
) -> str:
    """One tool call of the digest the frontier reads: the call, its arguments and its result, compact."""
    args = json.dumps(arguments, default=str) if arguments is not None else raw_arguments[:200]
    head = f"step {step}: " if step is not None else ""
    shown = result[:DIGEST_TEXT] if result is not None else "(no result)"
    return f"{head}{name}({args[:DIGEST_TEXT]}) -> {shown}"


def advice_entry(trigger: str, advice: str) -> str:
    """The digest's line for advice given, so a later consult knows what it said before."""
    who = "advisor" if trigger == "tool" else "planner"
    return f"{who} ({trigger}): {advice[:DIGEST_TEXT]}"


def transcript_digest(messages: list[Message], limit: int = DIGEST_ENTRIES) -> str:
    """The digest of a conversation seen whole (the proxy's view): user turns and tool calls with their
    results, the last `limit` entries."""
    results = {m.tool_call_id: m for m in messages if m.role == "tool"}
    lines = []
    for m in messages:
        if m.role == "user" and m.text.strip():
            lines.append(f"user: {m.text[:500]}")
        for c in m.tool_calls:
            r = results.get(c.id)
            lines.append(digest_entry(c.name, c.arguments, c.raw_arguments, r.text if r else None))
    return "\n".join(lines[-limit:])


@dataclass
class ConsultBrief:
    """What the frontier is told: the request of `consult_request.jinja`."""

    trigger: str
    goal: str
    tools: list[str]
    digest: str
    failures: int = 0  # consecutive failed steps before the consult
    answer: str | None = None  # the proposed or rejected answer (final, replan)
    detail: str = ""  # the last failure, the check's verdict, the user's new turn

    def messages(self) -> list[Message]:
        request = render(
            "consult_request",
            goal=self.goal,
            tools=self.tools,
            digest=self.digest,
            trigger=self.trigger,
            answer=self.answer,
            failures=self.failures,
            detail=self.detail,
        )
        return [Message.system(render("consult_system")), Message.user(request)]


@dataclass
class Consulted:
    """What one consult did. `outcome.kind`: skipped (`outcome.skip_reason`), takeover (the frontier is
    to act in the conversation; `mode` says takeover or restart), or the frontier's answer (advice,
    approved, objected) in `advice`, with the call's `response` and `cost_usd`."""

    trigger: str
    mode: str
    outcome: ConsultOutcome
    estimate_usd: float
    advice: str | None = None
    response: ModelResponse | None = None
    cost_usd: float = 0.0

    @property
    def kind(self) -> str:
        return self.outcome.kind


FrontierCall = Callable[[ChatRequest], Awaitable[ModelResponse]]


async def consult(
    brief: ConsultBrief,
    *,
    policy: EscalationPolicy,
    frontier: Slot,
    ledger: Ledger,
    max_usd: float,
    conversation: list[Message],
    call: FrontierCall,
    opening: int | None = None,
    max_tokens: int | None = None,
) -> Consulted:
    """Decides and makes one consult at `brief.trigger` (see the module's doc).

    `conversation`: the executor's messages, priced as the frontier's prompt when the consult hands it
    the turn (restart: only its first `opening` messages stay). `max_tokens`: the advice's cap (default
    `advice_max_tokens`), also its price beforehand. `call` raises whatever its caller raises when the
    frontier fails; the consult was counted by then."""
    trigger = brief.trigger
    messages = brief.messages()
    mode = "advise" if not policy.hands_over(trigger) else policy.config.mode
    if mode == "advise":
        est_in = estimate_tokens(messages)
    else:
        est_in = estimate_tokens(conversation[:opening] if mode == "restart" else conversation)
    cap = max_tokens or policy.config.advice_max_tokens
    estimate = frontier.price.cost(Usage(input=est_in, output=cap))
    outcome = policy.begin_consult(trigger, ledger.total_usd, estimate, max_usd)
    if outcome is not None:  # skipped, or the frontier takes the turn in the executor's conversation
        return Consulted(trigger, mode, outcome, estimate)
    before = ledger.total_usd
    resp = await call(ChatRequest(messages, max_tokens=cap, effort=frontier.effort))
    advice = resp.message.text.strip()
    return Consulted(
        trigger,
        mode,
        policy.advised(trigger, advice),
        estimate,
        advice=advice,
        response=resp,
        cost_usd=ledger.total_usd - before,
    )
