"""Telling a stuck model from a working one: the same tool call, failing again.

`CallRepeats` is the state of one conversation: per call (tool name and canonical arguments, or the raw
text of a call whose arguments did not parse; for a tool that is not offered, the name alone, since no
arguments can make it work) how often it failed, and the
last call that succeeded. The task loop asks it whether a call may run (`refusal`), reports each
outcome (`failed` / `succeeded`), and ends the task when one call has failed `limit` times
(`exhausted`); a proxy that sees only the conversation can keep the same counts from the tool calls and
results passing through it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

DEFAULT_LIMIT = 3


def call_key(name: str, arguments: Any, known: bool = True) -> str:
    """One string per distinct call: the name and its arguments as sorted JSON (the name alone for an
    unknown tool)."""
    if not known:
        return name
    return name + json.dumps(arguments, sort_keys=True, default=str)


@dataclass
class CallRepeats:
    """Failure counts per call. A call repeats without progress when it already failed, or when it is the
    same successful call as the one just before (the model is looping); such a call is refused, and
    the refusal counts as one more failure of it."""

    limit: int = DEFAULT_LIMIT
    failures: Counter[str] = field(default_factory=Counter)
    last_ok: str | None = None

    def refusal(self, key: str) -> str | None:
        """Why this call should not run again (the text the model gets), or None when it may run."""
        if self.failures[key]:
            return "error: this exact call was already made and failed; change the arguments or the approach"
        if key == self.last_ok:
            return "error: this exact call was just made and changed nothing; change the arguments or the approach"
        return None

    def failed(self, key: str) -> int:
        """Counts a failure (an error, an unknown tool, a refused repeat); returns the call's count."""
        self.failures[key] += 1
        self.last_ok = None
        return self.failures[key]

    def succeeded(self, key: str) -> None:
        self.last_ok = key

    def forget(self) -> None:
        """The world the calls act on changed (an edit, a command): what failed may work now."""
        self.failures.clear()
        self.last_ok = None

    def exhausted(self, key: str) -> bool:
        """Whether this call has failed `limit` times: the model is stuck on it."""
        return self.failures[key] >= self.limit
