"""The run's limits for a whole Ray cluster: one small actor hands out permits and books spend.

Every worker asks it before each model call (`RayGate.acquire`: one actor call) and hands the permit back
with the call's cost after it (`RayGate.release`); a call to an endpoint without `max_concurrency` in a
run without `max_usd` asks nothing. Per endpoint at most `max_concurrency` permits are out at once; once
the spend booked reaches the run's `max_usd`, no permit is handed out, so the budget is overrun by at most
the calls in flight. Permits are numbered and held per task attempt: when a worker dies
holding one, the driver hands that attempt's permits back (`forget`), so a dead node never leaks a slot.

The actor is asynchronous (its waits are asyncio waits, thousands of callers at once cost nothing) and
pinned to the driver's node (a hard affinity: Ray's soft one was seen to place it on another node), so it
lives as long as the run, whichever worker nodes come and go.
"""

from __future__ import annotations

import asyncio

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from advisor.limits import CallGate, Permit, SpendLimitReached


@ray.remote(num_cpus=0, max_concurrency=100_000, max_restarts=0)
class Limiter:
    def __init__(self, max_usd: float | None):
        self.max_usd = max_usd
        self.spent = 0.0
        self.calls = 0
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._held: dict[int, tuple[str, str]] = {}  # permit number -> (attempt, endpoint)
        self._next = 0
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def _spent_out(self) -> bool:
        return self.max_usd is not None and self.spent >= self.max_usd

    async def acquire(self, endpoint: str, limit: int | None, attempt: str) -> tuple[int, float]:
        """(permit number, spent); number -1 when the budget is spent (no permit is out then)."""
        if self._spent_out():
            return -1, self.spent
        sem = None
        if limit is not None:
            sem = self._slots.setdefault(endpoint, asyncio.Semaphore(limit))
            await sem.acquire()
            if self._spent_out():  # spent while this call waited for its slot
                sem.release()
                return -1, self.spent
        self._next += 1
        self._held[self._next] = (attempt, endpoint)
        n = self.in_flight.get(endpoint, 0) + 1
        self.in_flight[endpoint] = n
        self.peak[endpoint] = max(self.peak.get(endpoint, 0), n)
        return self._next, self.spent

    def _give_back(self, number: int) -> None:
        held = self._held.pop(number, None)
        if held is None:  # already handed back (a late release after the driver's forget)
            return
        endpoint = held[1]
        self.in_flight[endpoint] -= 1
        sem = self._slots.get(endpoint)
        if sem is not None:
            sem.release()

    async def release(self, number: int, cost_usd: float) -> None:
        self.spent += cost_usd
        self.calls += 1
        self._give_back(number)

    async def forget(self, attempt: str) -> int:
        """Hands back the permits a dead attempt still held; how many."""
        numbers = [n for n, (a, _) in self._held.items() if a == attempt]
        for n in numbers:
            self._give_back(n)
        return len(numbers)

    async def stats(self) -> dict:
        return {
            "spent_usd": self.spent,
            "calls": self.calls,
            "max_usd": self.max_usd,
            "in_flight": dict(self.in_flight),
            "peak": dict(self.peak),
        }


def start_limiter(max_usd: float | None):
    """The run's Limiter actor, on the driver's node."""
    here = ray.get_runtime_context().get_node_id()
    return Limiter.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(
        max_usd
    )


class RayGate(CallGate):
    """A worker's side of the Limiter, for one task attempt."""

    def __init__(self, limiter, attempt: str, max_usd: float | None):
        self.limiter = limiter
        self.attempt = attempt
        self.max_usd = max_usd

    async def acquire(self, endpoint: str, limit: int | None) -> Permit:
        if limit is None and self.max_usd is None:  # nothing to hold: no actor call
            return Permit(endpoint, 0)
        number, spent = await self.limiter.acquire.remote(endpoint, limit, self.attempt)
        if number < 0:
            raise SpendLimitReached(spent, self.max_usd if self.max_usd is not None else spent)
        return Permit(endpoint, number)

    async def release(self, permit: Permit, cost_usd: float) -> None:
        if permit.number:
            await self.limiter.release.remote(permit.number, cost_usd)
