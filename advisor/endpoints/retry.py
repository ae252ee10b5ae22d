"""Retry policy shared by the HTTP endpoints (tenacity underneath).

Retried: connection errors, timeouts, HTTP 429 and 5xx. Never retried: any other 4xx, or an invalid
response body. The wait before the next try is the server's `Retry-After` when it sent one (seconds,
or an HTTP date; OpenAI's `retry-after-ms` too), else exponential backoff with jitter. A Retry-After
longer than `max_retry_after_s` is not waited out: the call fails at once and says why.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TypeVar

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base

T = TypeVar("T")

Sleep = Callable[[float], Awaitable[None]]


@dataclass
class RetryPolicy:
    """How many times and how long to wait; tests shrink `backoff_s` and inject `sleep`."""

    max_retries: int = 4
    backoff_s: float = 0.5  # first backoff; doubles per retry, plus up to backoff_s of jitter
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 120.0
    sleep: Sleep = field(default=asyncio.sleep)


class AttemptFailed(Exception):
    """One failed attempt. `retryable` says whether another try may help."""

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        retryable: bool = True,
    ):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.retryable = retryable


def retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (delta seconds or HTTP date), else None."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _wait_s(exc: BaseException | None, policy: RetryPolicy, failed_attempts: int) -> float:
    """The wait after the `failed_attempts`-th failure: the server's Retry-After, else backoff."""
    if isinstance(exc, AttemptFailed) and exc.retry_after is not None:
        return exc.retry_after
    # exponential with additive jitter (tenacity's wait_exponential_jitter renamed its arguments
    # across versions; this is the same rule, stable across tenacity >= 8.2)
    exp = policy.backoff_s * 2 ** (failed_attempts - 1)
    return min(policy.max_backoff_s, exp + random.uniform(0, policy.backoff_s))


class _RetryAfterOrBackoff(wait_base):
    def __init__(self, policy: RetryPolicy, before: int = 0):
        self.policy = policy
        self.before = before  # attempts made before tenacity took over

    def __call__(self, retry_state) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        return _wait_s(exc, self.policy, self.before + retry_state.attempt_number)


def should_retry(exc: BaseException, policy: RetryPolicy) -> bool:
    if not isinstance(exc, AttemptFailed) or not exc.retryable:
        return False
    return exc.retry_after is None or exc.retry_after <= policy.max_retry_after_s


OnRetry = Callable[[AttemptFailed, int, float], None]


async def with_retries(
    attempt: Callable[[], Awaitable[T]], policy: RetryPolicy, on_retry: OnRetry | None = None
) -> T:
    """Await `attempt()` until it succeeds or the policy gives up; re-raises the last `AttemptFailed`.
    `on_retry(failure, retry number, wait in seconds)` runs before each wait, so a caller can say what it
    is waiting for (a dead URL otherwise looks like a hung run for the whole backoff)."""
    # the first try runs bare: most calls succeed at once, and building tenacity's machinery for
    # each of them cost a proxy more CPU than the HTTP call itself
    try:
        return await attempt()
    except AttemptFailed as e:
        if policy.max_retries == 0 or not should_retry(e, policy):
            raise
        first = e
    wait = _wait_s(first, policy, 1)
    if on_retry is not None:
        on_retry(first, 1, wait)
    await policy.sleep(wait)

    def before_sleep(state) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if on_retry is not None and isinstance(exc, AttemptFailed):
            on_retry(exc, state.attempt_number + 1, state.next_action.sleep if state.next_action else 0.0)

    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.max_retries),
        wait=_RetryAfterOrBackoff(policy, before=1),
        retry=retry_if_exception(lambda e: should_retry(e, policy)),
        sleep=policy.sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    return await retrying(attempt)
