"""Failure signals read from what a harness sends back: the proxy never runs a tool, so it learns how a
step went from the next request's tail (the messages after what it has already read).

A tool result is a failure when it is flagged (`is_error`) or its text matches one of
`escalation.error_patterns`; a tool call is a failure when it repeats one that already failed or the
one just before (`EscalationPolicy.repeated`); a new user turn is a failure when it matches
`escalation.wrong_patterns`. As in the loop, one request counts at most one failure, and a request whose
tool results all went well resets the streak.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from advisor.consult import ADVISOR_TOOL
from advisor.escalation import EscalationPolicy, call_key
from advisor.messages import Message, ToolCall


@dataclass
class Signals:
    failures: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail), first first
    tool_results: int = 0
    new_user_turn: bool = False  # the tail is the user's turn, not tool results
    user_text: str = ""


@lru_cache(maxsize=64)
def _compiled(patterns: tuple[str, ...]) -> list[re.Pattern]:
    return [re.compile(p) for p in patterns]  # each alone: patterns may carry their own (?i) flags


def _matches(patterns: list[str], text: str) -> bool:
    return any(rx.search(text) for rx in _compiled(tuple(patterns)))


def read_signals(
    messages: list[Message],
    start: int,
    policy: EscalationPolicy,
    error_patterns: list[str],
    wrong_patterns: list[str],
) -> Signals:
    """Signals in `messages[start:]`; updates the policy's repeated-call memory as the loop would."""
    out = Signals()
    tail = messages[start:]
    if not tail:
        return out
    calls: dict[str, ToolCall] = {
        c.id: c for m in messages[:start] + tail if m.role == "assistant" for c in m.tool_calls
    }
    # the advisor tool's results are the proxy's own consults sent back, not the harness's tools
    tool_msgs = [m for m in tail if m.role == "tool" and m.name != ADVISOR_TOOL]
    for m in tool_msgs:
        out.tool_results += 1
        call = calls.get(m.tool_call_id or "")
        key = call_key(call) if call is not None and call.arguments is not None else None
        name = call.name if call is not None else (m.name or "tool")
        if key is not None and policy.repeated(key):
            out.failures.append(("repeated_call", f"{name}: the same call again"))
        failed = m.is_error or _matches(error_patterns, m.text)
        if failed:
            out.failures.append(("tool_error", f"{name}: {m.text[:300]}"))
        if key is not None:
            if failed:
                policy.remember_failed(key)
            else:
                policy.remember_ok(key)
    users = [m for m in tail if m.role == "user" and m.text.strip()]
    if users and not tool_msgs:
        out.new_user_turn = True
        out.user_text = users[-1].text
        if start > 0 and _matches(wrong_patterns, out.user_text):
            out.failures.append(("user_says_wrong", out.user_text[:300]))
    return out
