"""Who answers a proxied request: the executor, or the frontier, by the loop's escalation rules.

For each request the router finds the session, reads the failure signals in the conversation's new
messages (`signals`), lets the session's `EscalationPolicy` decide a consult (the first request: `plan`;
a new user turn: `new_user_turn`; `after_failures` failures in a row: `failures`), applies the outcome
to the session's `TurnState` exactly as the loop does (advice inserted for the executor, or the frontier
answering the next `takeover_steps` requests), checks the budgets, sends the `ChatRequest` upstream and
records the call in the session's ledger and the journal.

Notes the loop would append to its conversation (advice, takeover, handback) are kept per session at
their position in the harness's conversation and inserted again into every later request, so the
executor keeps seeing them as it would in the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from advisor.endpoints import make_endpoint
from advisor.endpoints.base import ChatRequest, Endpoint, EndpointConfig, EndpointError
from advisor.endpoints.http import preferred_client
from advisor.endpoints.stream import Delta, StreamEnd
from advisor.escalation import ConsultOutcome, estimate_tokens
from advisor.messages import Attempt, Message, ModelResponse, Usage, without_images
from advisor.pricing import FREE, Price
from advisor.prompts import render
from advisor.proxy.config import ProxyConfig
from advisor.proxy.sessions import Consult, Session, SessionStore, session_key
from advisor.proxy.signals import read_signals

_DIGEST_ENTRIES = 60  # the consult sees the last tool calls of the conversation, not all of a long one


class Meter(Protocol):
    async def start_call(self, session: Session, role: str, model: str, estimate: float) -> Any: ...

    def settle(self, ticket: Any, cost: float, error: str | None = None, **call: Any) -> None: ...

    async def load_session(self, session: Session) -> bool: ...

    async def save_session(self, session: Session) -> None: ...

    def save_session_later(self, session: Session) -> None: ...


class ProxyError(Exception):
    """A request the proxy answers with an error: HTTP `status`, a `kind` for the wire's error type."""

    def __init__(self, status: int, kind: str, message: str, session: Session | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.session = status, kind, message, session


@dataclass
class Slot:
    """A role's endpoint, as `upstream_pools` instances of it: each session keeps to one (an Anthropic
    endpoint replays the thinking blocks it received), and each pool stays small, since httpx scans its
    whole pool at every request and response (at 40 concurrent sessions one pool cost more CPU than the
    rest of the proxy)."""

    role: str
    pool: list[Endpoint]
    price: Price
    effort: str | None

    @property
    def endpoint(self) -> Endpoint:
        return self.pool[0]

    def for_session(self, session_id: str) -> Endpoint:
        return self.pool[zlib.crc32(session_id.encode()) % len(self.pool)]


class RoutedStream:
    """A streamed answer: who answers (known before the first delta) and the upstream's deltas, the
    first already in, ending with a StreamEnd. Iterate it once; `aclose()` always (it unlocks the
    session), also when it was never iterated."""

    def __init__(
        self,
        role: str,
        model: str,
        session: Session,
        consult: Consult | None,
        head: Delta,
        rest: AsyncIterator[Delta],
        done: Callable[[], None],
    ):
        self.role, self.model, self.session, self.consult = role, model, session, consult
        self._head, self._rest, self._done = head, rest, done

    async def __aiter__(self) -> AsyncIterator[Delta]:
        yield self._head
        async for delta in self._rest:
            yield delta

    async def aclose(self) -> None:
        if self._done is None:
            return
        try:
            await self._rest.aclose()
        finally:
            done, self._done = self._done, None
            done()


@dataclass
class Routed:
    response: ModelResponse
    role: str
    model: str
    session: Session
    consult: Consult | None


def _price(ep: Endpoint) -> Price:
    return ep.config.price or FREE


def _digest(messages: list[Message]) -> str:
    results = {m.tool_call_id: m for m in messages if m.role == "tool"}
    lines = []
    for m in messages:
        if m.role == "user" and m.text.strip():
            lines.append(f"user: {m.text[:500]}")
        for c in m.tool_calls:
            args = json.dumps(c.arguments, default=str) if c.arguments is not None else c.raw_arguments[:200]
            r = results.get(c.id)
            lines.append(f"{c.name}({args[:300]}) -> {r.text[:300] if r else '(no result)'}")
    return "\n".join(lines[-_DIGEST_ENTRIES:])


def _with(request: ChatRequest, **changes) -> ChatRequest:
    """dataclasses.replace(request, **changes), without its look-up of the fields at every call (a
    hot spot of a proxied request)."""
    new = object.__new__(ChatRequest)
    new.__dict__.update(request.__dict__, **changes)
    return new


def upstream_options(config: ProxyConfig, endpoint: EndpointConfig) -> dict:
    """make_endpoint's options for a proxy upstream: its HTTP client, and streaming when asked."""
    options: dict = {}
    if endpoint.provider in ("openai", "anthropic"):
        client = config.upstream_client
        if client == "auto":
            base = endpoint.base_url or ("https://" if endpoint.provider == "anthropic" else "")
            client = preferred_client(base)
        options["http_client"] = client
    if endpoint.provider == "openai" and config.upstream_stream:
        options["stream"] = True
    return options


def with_inserts(messages: list[Message], inserts: list[tuple[int, str]]) -> list[Message]:
    """The conversation with the session's notes at their positions (ones past its end go last)."""
    if not inserts:
        return messages
    out: list[Message] = []
    pending = sorted(inserts, key=lambda x: x[0])
    j = 0
    for i, m in enumerate(messages):
        while j < len(pending) and pending[j][0] <= i:
            out.append(Message.user(pending[j][1]))
            j += 1
        out.append(m)
    out += [Message.user(t) for _, t in pending[j:]]
    return out


class Router:
    def __init__(
        self,
        config: ProxyConfig,
        endpoints: dict[str, Endpoint | list[Endpoint]] | None = None,
        store: SessionStore | None = None,
    ):
        self.config = config
        self.meter: Meter | None = None  # keys' budgets and the call records (advisor.proxy.auth.Gate)
        given = dict(endpoints or {})

        def slot(role: str) -> Slot | None:
            rc = getattr(config, role)
            if rc is None:
                return None
            pool = given.get(rc.endpoint)
            if pool is None:
                cfg = config.endpoints[rc.endpoint]
                options = upstream_options(config, cfg)
                pool = [make_endpoint(rc.endpoint, cfg, **options) for _ in range(config.upstream_pools)]
            elif not isinstance(pool, list):
                pool = [pool]
            given[rc.endpoint] = pool
            return Slot(role, pool, _price(pool[0]), rc.effort)

        self.executor = slot("executor")
        self.frontier = slot("frontier")
        assert self.executor is not None
        self._owned = {id(e): e for s in (self.executor, self.frontier) if s is not None for e in s.pool}
        self.store = store or SessionStore(
            config.escalation,
            self.frontier.price if self.frontier else None,
            has_frontier=self.frontier is not None,
            directory=config.sessions_dir,
            ttl_s=config.sessions.ttl_s,
            max_sessions=config.sessions.max_sessions,
            fsync=config.sessions.fsync,
        )

    async def aclose(self) -> None:
        for ep in self._owned.values():
            await ep.aclose()
        self.store.close()

    # -- one request -------------------------------------------------------------------------
    async def handle(self, request: ChatRequest, session_id: str | None = None) -> Routed:
        sid = session_id or session_key(request.messages)
        session, first = self.store.get(sid)
        async with session.lock:  # one conversation's requests are decided in order
            # replicas: another one may have moved the session on (then this is not its first request)
            if self.meter is not None and await self.meter.load_session(session):
                first = False
            try:
                return await self._handle(session, first, request)
            finally:
                self.store.save(session)
                if self.meter is not None:
                    await self.meter.save_session(session)

    async def stream(self, request: ChatRequest, session_id: str | None = None) -> RoutedStream:
        """Route a streamed request: decided as `handle` decides, then the upstream's reply is streamed.
        Returns once the first delta is in (the upstream's retries are over by then; when they fail,
        ProxyError is raised as for `handle`). The session stays locked until the stream is closed."""
        sid = session_id or session_key(request.messages)
        session, first = self.store.get(sid)
        await session.lock.acquire()
        meter = self.meter

        def done() -> None:
            self.store.save(session)
            session.lock.release()
            if meter is not None:  # written after the stream (a task: this runs from its close)
                meter.save_session_later(session)

        deltas = None
        try:
            if meter is not None and await meter.load_session(session):
                first = False
            acting, purpose, upstream, consult = await self._decide(session, first, request)
            deltas = self._upstream(session, acting, purpose, upstream, stream=True)
            head = await anext(deltas)
        except BaseException:
            if deltas is not None:
                await deltas.aclose()
            done()
            raise
        self.store.commit()  # the decision's events, before the headers saying who answers go out
        return RoutedStream(acting.role, acting.endpoint.config.model, session, consult, head, deltas, done)

    async def _handle(self, s: Session, first: bool, request: ChatRequest) -> Routed:
        acting, purpose, upstream, consult = await self._decide(s, first, request)
        resp = await self._call(s, acting, purpose, upstream)
        return Routed(resp, acting.role, resp.model or acting.endpoint.config.model, s, consult)

    async def _decide(
        self, s: Session, first: bool, request: ChatRequest
    ) -> tuple[Slot, str, ChatRequest, Consult | None]:
        """Read the request's signals, consult when due, and pick who answers: (slot, purpose, the
        request to send it, the consult this request set off)."""
        esc = self.config.escalation
        policy, turn, messages = s.policy, s.turn, request.messages
        s.requests += 1
        start = s.seen if s.seen <= len(messages) else 0
        sig = read_signals(messages, start, policy, esc.error_patterns, esc.wrong_patterns)
        s.seen = len(messages)
        due = False
        if sig.failures:
            due = policy.failure(s.requests, *sig.failures[0], self.store.trace_for(s))
        elif sig.tool_results:
            policy.success()
        trigger = None
        if due:
            trigger = "failures"
        elif first and policy.wants("plan"):
            trigger = "plan"
        elif sig.new_user_turn and not first and policy.wants("new_user_turn"):
            trigger = "new_user_turn"
        consult = None
        if trigger is not None and self.frontier is not None:
            self._check_budget(s)
            detail = sig.failures[0][1] if trigger == "failures" else sig.user_text[:300]
            consult, outcome = await self._consult(s, trigger, request, detail)
            turn.apply(outcome)
        by_frontier, handback = turn.start_step(self.frontier is not None)
        if handback and policy.notes_handback:
            s.inserts.append((len(messages), render("handback")))
        acting = self.frontier if by_frontier and self.frontier is not None else self.executor
        assert acting is not None
        self._check_budget(s)
        # the client's own fields (tools, caps, sampling) pass through; the role's effort is the proxy's
        upstream = _with(request, messages=with_inserts(messages, s.inserts), effort=acting.effort)
        return acting, "takeover" if by_frontier else "step", upstream, consult

    def _check_budget(self, s: Session) -> None:
        b = self.config.budget
        spent = s.ledger.total_usd
        if spent >= b.max_usd:
            raise ProxyError(
                402,
                "budget_exceeded",
                f"advisor proxy: session {s.id} reached its budget (max_usd {b.max_usd:g}, spent ${spent:.6f}); "
                "start a new session or raise budget.max_usd in proxy.yaml",
                s,
            )
        if b.max_usd_per_day is not None:
            day = self.store.spent_today()
            # calls in flight count at their estimate, so concurrent sessions cannot all cross the cap
            if day >= b.max_usd_per_day or (
                self.store.in_flight and day + self.store.reserved_usd >= b.max_usd_per_day
            ):
                raise ProxyError(
                    402,
                    "budget_exceeded",
                    f"advisor proxy: the daily budget is reached (max_usd_per_day {b.max_usd_per_day:g}, "
                    f"spent ${day:.6f} today, UTC); it resets at midnight UTC",
                    s,
                )

    async def _call(self, s: Session, slot: Slot, purpose: str, request: ChatRequest) -> ModelResponse:
        async for delta in self._upstream(s, slot, purpose, request, stream=False):
            assert isinstance(delta, StreamEnd)
            return delta.response
        raise AssertionError("an upstream call ends in a StreamEnd")

    async def _upstream(
        self, s: Session, slot: Slot, purpose: str, request: ChatRequest, *, stream: bool
    ) -> AsyncIterator[Delta]:
        """One upstream call, booked: the reply's deltas as they come when `stream` (else only the end),
        then its StreamEnd. The call goes in the ledger and journal however it ends: done, failed
        (ProxyError; mid-stream, with the usage of what was streamed) or cancelled (the client left)."""
        if not slot.endpoint.config.vision:
            request = _with(request, messages=without_images(request.messages))
        cap = request.max_tokens or slot.endpoint.config.max_tokens or 1024
        estimate = slot.price.cost(Usage(input=estimate_tokens(request.messages), output=cap))
        attempts: list[Attempt] = []
        store, meter = self.store, self.meter
        # the key's budget is checked (ProxyError when spent) and the call recorded as started
        ticket = await meter.start_call(s, slot.role, slot.endpoint.config.model, estimate) if meter else None
        store.in_flight += 1
        store.reserved_usd += estimate
        sent = 0  # characters forwarded to the client

        def book(usage: Usage, **extra) -> None:
            store.in_flight -= 1
            store.reserved_usd = max(0.0, store.reserved_usd - estimate)
            if stream:
                extra["streamed_chars"] = sent
            cost = store.record_call(
                s, slot.role, slot.endpoint.name, purpose, usage, slot.price, request=s.requests, **extra
            )
            if meter is not None:
                meter.settle(
                    ticket,
                    cost,
                    extra.get("error"),
                    usage=usage.as_dict(),
                    endpoint=slot.endpoint.name,
                    purpose=purpose,
                )
            if stream:  # written before the stream's end (its usage) reaches the client
                store.commit()

        def billed(given: list[Attempt]) -> Usage:
            usage = Usage()
            for a in given:
                if a.usage is not None:
                    usage = usage + a.usage
            return usage

        endpoint = slot.for_session(s.id)
        try:
            if stream:
                async with contextlib.aclosing(
                    endpoint.stream(request, on_attempt=attempts.append)
                ) as deltas:
                    async for delta in deltas:
                        if isinstance(delta, StreamEnd):
                            resp = delta.response
                            break
                        sent += len(getattr(delta, "text", None) or getattr(delta, "arguments", ""))
                        yield delta
            else:
                resp = await endpoint.complete(request, on_attempt=attempts.append)
        except EndpointError as e:
            book(billed(e.attempts or attempts), error=str(e))
            status, kind = (504, "timeout_error") if "timeout after" in str(e) else (502, "api_error")
            raise ProxyError(status, kind, f"advisor proxy: upstream {slot.role} failed: {e}", s) from None
        except BaseException as e:
            # the client went away mid-call: whatever the attempts billed still goes in the ledger
            gone = isinstance(e, (asyncio.CancelledError, GeneratorExit))
            book(billed(attempts), error="cancelled" if gone else f"{type(e).__name__}: {e}")
            raise
        book(resp.usage, model=resp.model, finish_reason=resp.finish_reason)
        yield StreamEnd(resp)

    async def _consult(
        self, s: Session, trigger: str, request: ChatRequest, detail: str
    ) -> tuple[Consult, ConsultOutcome]:
        assert self.frontier is not None
        policy, messages = s.policy, request.messages
        goal = next((m.text for m in reversed(messages) if m.role == "user" and m.text.strip()), "")
        consult_msgs = [
            Message.system(render("consult_system")),
            Message.user(
                render(
                    "consult_request",
                    goal=goal[:4000],
                    tools=[t.name for t in request.tools or []],
                    digest=_digest(messages),
                    trigger=trigger,
                    answer=None,
                    failures=policy.consecutive,
                    detail=detail,
                )
            ),
        ]
        cap = policy.config.advice_max_tokens
        est_in = estimate_tokens(messages if policy.hands_over(trigger) else consult_msgs)
        estimate = self.frontier.price.cost(Usage(input=est_in, output=cap))
        outcome = policy.begin_consult(trigger, s.ledger.total_usd, estimate, self.config.budget.max_usd)
        if outcome is not None:  # skipped, or takeover: the frontier answers in the harness's conversation
            consult = Consult(trigger, outcome.kind, s.requests, outcome.skip_reason)
            if outcome.kind == "takeover":
                s.inserts.append(
                    (len(messages), render("takeover", steps=outcome.takeover_steps, trigger=trigger))
                )
            self.store.record_consult(s, consult, estimated_cost_usd=estimate)
            return consult, outcome
        before = s.ledger.total_usd
        resp = await self._call(
            s,
            self.frontier,
            "consult",
            ChatRequest(consult_msgs, max_tokens=cap, effort=self.frontier.effort),
        )
        advice = resp.message.text.strip()
        s.inserts.append((len(messages), render("advice", trigger=trigger, advice=advice)))
        consult = Consult(trigger, "advice", s.requests, None, s.ledger.total_usd - before)
        self.store.record_consult(s, consult, estimated_cost_usd=estimate, advice=advice[:2000])
        return consult, policy.advised(trigger, advice)
