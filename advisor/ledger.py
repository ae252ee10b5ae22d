"""The cost ledger: every model call's tokens times its endpoint's price, per role and per task."""

from __future__ import annotations

from dataclasses import dataclass, field

from advisor.messages import Usage
from advisor.pricing import Price

ROLES = ("executor", "frontier")


@dataclass
class CallRecord:
    role: str
    endpoint: str
    purpose: str
    usage: Usage
    cost_usd: float


@dataclass
class Ledger:
    """`frontier_price` prices the whole task's tokens for the frontier-only estimate (None: unknown)."""

    frontier_price: Price | None = None
    calls: list[CallRecord] = field(default_factory=list)
    # the running total over calls[:_counted] (calls is append-only): a proxy reads the total at every
    # request, and summing a long session's calls each time grew with the session
    _total: float = field(default=0.0, init=False, repr=False, compare=False)
    _counted: int = field(default=0, init=False, repr=False, compare=False)

    def record(self, role: str, endpoint: str, purpose: str, usage: Usage, price: Price) -> CallRecord:
        rec = CallRecord(role, endpoint, purpose, usage, price.cost(usage))
        self.calls.append(rec)
        return rec

    def tokens(self, role: str) -> Usage:
        total = Usage()
        for c in self.calls:
            if c.role == role:
                total = total + c.usage
        return total

    def cost(self, role: str | None = None) -> float:
        return sum(c.cost_usd for c in self.calls if role is None or c.role == role)

    @property
    def total_usd(self) -> float:
        calls = self.calls
        if len(calls) < self._counted:  # replaced rather than appended to: count again
            self._total, self._counted = 0.0, 0
        total = self._total
        for c in calls[self._counted :]:  # same order of additions as sum(), so the same float
            total += c.cost_usd
        self._total, self._counted = total, len(calls)
        return total

    def frontier_only_estimate(self) -> float:
        if self.frontier_price is None:
            return 0.0
        return sum(self.frontier_price.cost(c.usage) for c in self.calls)

    def tokens_dict(self) -> dict:
        out = {}
        for role in ROLES:
            u = self.tokens(role).as_dict()
            u.pop("estimated")
            out[role] = u
        return out

    def cost_dict(self) -> dict:
        return {
            "executor": round(self.cost("executor"), 10),
            "frontier": round(self.cost("frontier"), 10),
            "total": round(self.total_usd, 10),
            "frontier_only_estimate": round(self.frontier_only_estimate(), 10),
        }
