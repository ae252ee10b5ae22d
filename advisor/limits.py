"""Limits shared by every task of a run: calls in flight per endpoint and the run's spend.

An endpoint's `max_concurrency` caps the model calls in flight to it across all the run's tasks; a run's
`max_usd` (`advisor eval --max-usd`, `advisor run --max-usd`) stops new model calls once the spend booked
reaches it. A task asks its gate before each model call (`acquire`) and hands the permit back with what the
call cost (`release`); a call that finds the budget spent is refused with `SpendLimitReached`, which ends
the task as `budget_exceeded`. So the budget is overrun by at most the calls already in flight.

`LocalGate` holds the limits for the tasks of one process; `advisor.cluster.limiter` holds them for a
whole Ray cluster (one small actor), behind the same `CallGate` interface.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass


class SpendLimitReached(Exception):
    """The run's max_usd is spent: no new model call starts."""

    def __init__(self, spent: float, limit: float):
        super().__init__(f"run max_usd {limit} reached (spent {spent:.6f})")
        self.spent = spent
        self.limit = limit


@dataclass
class Permit:
    endpoint: str
    number: int = 0  # the gate's own handle (the cluster gate numbers its permits)


class CallGate(ABC):
    """Permits for model calls: per endpoint (`limit`: its max_concurrency, None for no cap) and spend."""

    @abstractmethod
    async def acquire(self, endpoint: str, limit: int | None) -> Permit:
        """Waits for a free slot on `endpoint`; `SpendLimitReached` when the run's budget is spent."""

    @abstractmethod
    async def release(self, permit: Permit, cost_usd: float) -> None:
        """Hands the slot back and books what the call cost (0 for a call that failed unbilled)."""


class LocalGate(CallGate):
    """The limits for tasks on one event loop (what `Advisor` uses when it runs tasks itself)."""

    def __init__(self, max_usd: float | None = None):
        self.max_usd = max_usd
        self.spent = 0.0
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}  # the most calls an endpoint had in flight at once
        self._slots: dict[str, asyncio.Semaphore] = {}

    def _check(self) -> None:
        if self.max_usd is not None and self.spent >= self.max_usd:
            raise SpendLimitReached(self.spent, self.max_usd)

    async def acquire(self, endpoint: str, limit: int | None) -> Permit:
        self._check()
        sem = None
        if limit is not None:
            sem = self._slots.setdefault(endpoint, asyncio.Semaphore(limit))
            await sem.acquire()
            try:  # the budget may have been spent while this call waited for its slot
                self._check()
            except SpendLimitReached:
                sem.release()
                raise
        n = self.in_flight.get(endpoint, 0) + 1
        self.in_flight[endpoint] = n
        self.peak[endpoint] = max(self.peak.get(endpoint, 0), n)
        return Permit(endpoint)

    async def release(self, permit: Permit, cost_usd: float) -> None:
        self.spent += cost_usd
        self.in_flight[permit.endpoint] -= 1
        sem = self._slots.get(permit.endpoint)
        if sem is not None:
            sem.release()
