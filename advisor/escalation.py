"""When to consult the frontier, and what a consult hands over: the escalation state machine as data.

`EscalationPolicy` holds the rules of one conversation (consecutive failures, inflection points, the
consult budget, repeated calls: `advisor.repeats.CallRepeats`) and their counters; `TurnState` says who acts at the next step;
`ConsultOutcome` is what one consult changed. The task loop drives them step by step; a proxy that sees
only the conversation reuses the same objects, so both follow one copy of the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from advisor import repeats
from advisor.messages import Message, TextPart, ToolCall
from advisor.repeats import CallRepeats
from advisor.task import Escalation
from advisor.trace import Trace

# the failure reasons of the loop and the proxy, by the `escalation.failure_signals` entry that governs them
SIGNAL_OF = {
    "tool_error": "tool_error",
    "malformed_tool_call": "tool_error",
    "unknown_tool": "tool_error",
    "nonzero_exit": "nonzero_exit",
    "repeated_call": "repeated_call",
    "check_rejected": "check_failed",
}

ConsultKind = Literal["skipped", "advice", "approved", "objected", "takeover"]


def call_key(tc: ToolCall) -> str:
    """What makes two tool calls "the same call" for `EscalationPolicy.repeated` (`advisor.repeats`)."""
    return repeats.call_key(tc.name, tc.arguments)


def estimate_tokens(messages: list[Message]) -> int:
    """A consult's prompt size before it is made (to price it against the budget)."""
    chars = sum(len(p.text) for m in messages for p in m.content if isinstance(p, TextPart))
    images = sum(len(m.images) for m in messages)
    return chars // 4 + 200 * images + 16 * len(messages)


@dataclass(frozen=True)
class ConsultOutcome:
    """What one consult changed.

    skipped: not made (`skip_reason`: max_consults or budget); advice: the frontier's guidance is in the
    conversation and the executor goes on; approved / objected: a final-answer review's verdict (an
    objection's advice is in the conversation); takeover: the frontier acts for `takeover_steps` steps
    (takeover and restart modes).
    """

    kind: ConsultKind
    takeover_steps: int = 0
    skip_reason: str | None = None


@dataclass
class TurnState:
    """Who acts at the next step: the frontier while takeover steps are left, else the executor."""

    takeover_left: int = 0  # steps the frontier still takes
    frontier_acted: bool = False  # the previous step was the frontier's
    rejected: int = 0  # answers the check turned down

    def start_step(self, has_frontier: bool) -> tuple[bool, bool]:
        """(frontier acts now, the executor takes the turn back now); spends one takeover step."""
        frontier = self.takeover_left > 0 and has_frontier
        self.takeover_left = max(0, self.takeover_left - 1)
        handback = not frontier and self.frontier_acted
        self.frontier_acted = frontier
        return frontier, handback

    def apply(self, outcome: ConsultOutcome) -> None:
        # a consult replaces what an earlier one granted: advice or a skip ends a takeover in progress
        self.takeover_left = outcome.takeover_steps


@dataclass
class EscalationPolicy:
    config: Escalation
    enabled: bool = True
    consecutive: int = 0
    consults: int = 0
    skipped: int = 0
    final_done: bool = False
    calls: CallRepeats = field(default_factory=CallRepeats)  # repeated calls: refused, then the end

    def wants(self, trigger: str) -> bool:
        return self.enabled and trigger in self.config.at

    def counts(self, reason: str) -> bool:
        """Whether a step failed for `reason` is a failed step under `failure_signals` (reasons outside
        the four signals, such as an empty reply, always count)."""
        signal = SIGNAL_OF.get(reason)
        return signal is None or signal in self.config.failure_signals

    def failure(self, step: int, reason: str, detail: str, trace: Trace) -> bool:
        """Counts a failed step; True when it is time to consult. A reason whose signal is switched off
        counts nothing (and returns False)."""
        if not self.counts(reason):
            return False
        self.consecutive += 1
        trace.emit("step_failed", step=step, reason=reason, detail=detail[:500], consecutive=self.consecutive)
        return self.enabled and self.consecutive >= self.config.after_failures

    def success(self) -> None:
        self.consecutive = 0

    def reset(self) -> None:
        self.consecutive = 0

    # Repeated calls (`advisor.repeats.CallRepeats`): a call repeats "without progress" when the very
    # same call already failed, or it is the same successful call as the one just before.
    def repeated(self, key: str) -> bool:
        return self.calls.refusal(key) is not None

    def remember_failed(self, key: str) -> None:
        self.calls.failed(key)

    def forget_failed(self) -> None:
        """The workspace may have changed (an edit, a command): calls that failed may now succeed."""
        self.calls.forget()

    def remember_ok(self, key: str) -> None:
        self.calls.succeeded(key)

    # -- consults ----------------------------------------------------------------------------
    def hands_over(self, trigger: str) -> bool:
        """Whether a consult at `trigger` gives the frontier the turn (takeover, restart) instead of
        asking it for advice; a final-answer review and the executor's own call (`tool`) always ask."""
        return self.config.mode in ("takeover", "restart") and trigger not in ("final", "tool")

    @property
    def notes_handback(self) -> bool:
        """Whether the executor is told it has the turn again after the frontier's steps: not after a
        restart, whose one clean attempt the executor continues as its own."""
        return self.config.mode != "restart"

    def skip_reason(self, spent: float, estimate: float, max_usd: float) -> str | None:
        if self.consults >= self.config.max_consults:
            return "max_consults"
        if spent + estimate > max_usd:
            return "budget"
        return None

    def begin_consult(
        self, trigger: str, spent: float, estimate: float, max_usd: float
    ) -> ConsultOutcome | None:
        """Decides a consult priced at `estimate`: a skipped or takeover outcome, or None when the frontier
        is to be asked for advice (then `advised` gives the outcome). A consult made resets the streak."""
        reason = self.skip_reason(spent, estimate, max_usd)
        if reason:
            self.skipped += 1
            return ConsultOutcome("skipped", skip_reason=reason)
        self.consults += 1
        self.reset()
        if self.hands_over(trigger):
            return ConsultOutcome("takeover", takeover_steps=self.config.takeover_steps)
        return None

    @staticmethod
    def advised(trigger: str, advice: str) -> ConsultOutcome:
        """The outcome of the frontier's advice; a final-answer review approves with APPROVE."""
        if trigger != "final":
            return ConsultOutcome("advice")
        return ConsultOutcome("approved" if advice.upper().startswith("APPROVE") else "objected")
