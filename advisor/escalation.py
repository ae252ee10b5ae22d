"""When to consult the frontier: consecutive failures, inflection points, and the consult budget."""

from __future__ import annotations

from dataclasses import dataclass, field

from advisor.task import Escalation
from advisor.trace import Trace


@dataclass
class EscalationPolicy:
    config: Escalation
    enabled: bool = True
    consecutive: int = 0
    consults: int = 0
    skipped: int = 0
    final_done: bool = False
    _failed_calls: set[str] = field(default_factory=set)
    _last_ok: str | None = None

    def wants(self, trigger: str) -> bool:
        return self.enabled and trigger in self.config.at

    def failure(self, step: int, reason: str, detail: str, trace: Trace) -> bool:
        """Counts a failed step; True when it is time to consult."""
        self.consecutive += 1
        trace.emit("step_failed", step=step, reason=reason, detail=detail[:500], consecutive=self.consecutive)
        return self.enabled and self.consecutive >= self.config.after_failures

    def success(self) -> None:
        self.consecutive = 0

    def reset(self) -> None:
        self.consecutive = 0

    # A call repeats "without progress" when the very same call already failed, or it is the
    # same successful call as the one just before (the model is looping).
    def repeated(self, key: str) -> bool:
        return key in self._failed_calls or key == self._last_ok

    def remember_failed(self, key: str) -> None:
        self._failed_calls.add(key)
        self._last_ok = None

    def remember_ok(self, key: str) -> None:
        self._last_ok = key

    def skip_reason(self, spent: float, estimate: float, max_usd: float) -> str | None:
        if self.consults >= self.config.max_consults:
            return "max_consults"
        if spent + estimate > max_usd:
            return "budget"
        return None
