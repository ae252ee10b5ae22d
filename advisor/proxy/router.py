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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from advisor.consult import ADVISOR_TOOL, ConsultBrief, Slot, consult, transcript_digest
from advisor.endpoints import make_endpoint
from advisor.endpoints.base import ChatRequest, Endpoint, EndpointConfig, EndpointError
from advisor.endpoints.http import preferred_client
from advisor.endpoints.stream import Delta, StreamEnd, ToolCallDelta
from advisor.escalation import ConsultOutcome, estimate_tokens
from advisor.messages import Attempt, Message, ModelResponse, Usage, without_images
from advisor.pricing import FREE, Price
from advisor.prompts import render
from advisor.proxy.advisor_tool import (
    MAX_USES,
    OVERLOADED,
    PING_EVERY_S,
    TOO_LONG,
    TOO_MANY,
    UNAVAILABLE,
    AdvisedResponse,
    AdvisorCall,
    AdvisorResult,
    AdvisorToolSpec,
    Iteration,
    IterationEnd,
    Ping,
    result_text,
    server_tool_id,
)
from advisor.proxy.config import ProxyConfig
from advisor.proxy.sessions import Consult, Session, SessionStore, session_key
from advisor.proxy.signals import read_signals


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
    tool_consults: list[Consult] = field(default_factory=list)  # the executor's advisor-tool calls


def _price(ep: Endpoint) -> Price:
    return ep.config.price or FREE


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
            return Slot(role, pool[0], _price(pool[0]), rc.effort, pool)

        self.executor = slot("executor")
        self.frontier = slot("frontier")
        assert self.executor is not None
        self._owned = {id(e): e for s in (self.executor, self.frontier) if s is not None for e in s.pool}
        self._advisors: dict[str, Slot] = {}  # advisor_models' endpoints, made at their first use
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
    async def handle(
        self, request: ChatRequest, session_id: str | None = None, advisor: AdvisorToolSpec | None = None
    ) -> Routed:
        """Route a request; `advisor`: the request offered the advisor tool (`advisor.proxy.advisor_tool`)."""
        sid = session_id or session_key(request.messages)
        session, first = self.store.get(sid)
        async with session.lock:  # one conversation's requests are decided in order
            # replicas: another one may have moved the session on (then this is not its first request)
            if self.meter is not None and await self.meter.load_session(session):
                first = False
            try:
                return await self._handle(session, first, request, advisor)
            finally:
                self.store.save(session)
                if self.meter is not None:
                    await self.meter.save_session(session)

    async def stream(
        self, request: ChatRequest, session_id: str | None = None, advisor: AdvisorToolSpec | None = None
    ) -> RoutedStream:
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
            if advisor is not None:
                deltas = self._advised(session, acting, purpose, upstream, advisor, stream=True)
            else:
                deltas = self._upstream(session, acting, purpose, upstream, stream=True)
            head = await anext(deltas)
        except BaseException:
            if deltas is not None:
                await deltas.aclose()
            done()
            raise
        self.store.commit()  # the decision's events, before the headers saying who answers go out
        return RoutedStream(acting.role, acting.endpoint.config.model, session, consult, head, deltas, done)

    async def _handle(
        self, s: Session, first: bool, request: ChatRequest, advisor: AdvisorToolSpec | None = None
    ) -> Routed:
        acting, purpose, upstream, consult = await self._decide(s, first, request)
        if advisor is None:
            resp = await self._call(s, acting, purpose, upstream)
            return Routed(resp, acting.role, resp.model or acting.endpoint.config.model, s, consult)
        made = len(s.consults)
        async for event in self._advised(s, acting, purpose, upstream, advisor, stream=False):
            if isinstance(event, StreamEnd):
                resp = event.response
        tools = [c for c in s.consults[made:] if c.trigger == "tool"]
        return Routed(resp, acting.role, resp.model or acting.endpoint.config.model, s, consult, tools)

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
        """Consults the frontier (the consult core, `advisor.consult`); what the proxy does with the
        outcome: a note inserted into this and every later request, and the session's journal."""
        assert self.frontier is not None
        frontier, messages = self.frontier, request.messages
        goal = next((m.text for m in reversed(messages) if m.role == "user" and m.text.strip()), "")
        brief = ConsultBrief(
            trigger,
            goal=goal[:4000],
            tools=[t.name for t in request.tools or []],
            digest=transcript_digest(messages),
            failures=s.policy.consecutive,
            detail=detail,
        )
        done = await consult(
            brief,
            policy=s.policy,
            frontier=frontier,
            ledger=s.ledger,
            max_usd=self.config.budget.max_usd,
            conversation=messages,
            call=lambda req: self._call(s, frontier, "consult", req),
        )
        outcome = done.outcome
        if done.advice is None:  # skipped, or takeover: the frontier answers in the harness's conversation
            consult_ = Consult(trigger, outcome.kind, s.requests, outcome.skip_reason)
            if outcome.kind == "takeover":
                s.inserts.append(
                    (len(messages), render("takeover", steps=outcome.takeover_steps, trigger=trigger))
                )
            self.store.record_consult(s, consult_, estimated_cost_usd=done.estimate_usd)
            return consult_, outcome
        s.inserts.append((len(messages), render("advice", trigger=trigger, advice=done.advice)))
        consult_ = Consult(trigger, "advice", s.requests, None, done.cost_usd)
        self.store.record_consult(
            s, consult_, estimated_cost_usd=done.estimate_usd, advice=done.advice[:2000]
        )
        return consult_, outcome

    # -- the advisor tool (advisor.proxy.advisor_tool) ---------------------------------------------
    def _advisor_slot(self, spec: AdvisorToolSpec) -> Slot:
        """The endpoint that advises: `advisor_models[spec.model]`, else the frontier role."""
        name = self.config.advisor_models.get(spec.model or "")
        if name is None or (self.frontier is not None and name == self.frontier.endpoint.name):
            if self.frontier is None:
                raise ProxyError(
                    400,
                    "invalid_request_error",
                    f"advisor proxy: no advisor for model {spec.model!r}: set `frontier:` in proxy.yaml or map "
                    "the model to an endpoint under `advisor_models:`",
                )
            return self.frontier
        slot = self._advisors.get(name)
        if slot is None:
            cfg = self.config.endpoints[name]
            options = upstream_options(self.config, cfg)
            pool = [make_endpoint(name, cfg, **options) for _ in range(self.config.upstream_pools)]
            self._owned.update((id(e), e) for e in pool)
            slot = self._advisors[name] = Slot("frontier", pool[0], _price(pool[0]), None, pool)
        return slot

    async def _advised(
        self,
        s: Session,
        acting: Slot,
        purpose: str,
        request: ChatRequest,
        spec: AdvisorToolSpec,
        *,
        stream: bool,
    ) -> AsyncIterator:
        """The executor's turn with the advisor tool served: executor calls until one asks for no
        advice, each `advisor` call answered by a consult (the events: `advisor.proxy.advisor_tool`)."""
        advisor = self._advisor_slot(spec)
        messages = list(request.messages)
        segments: list = []
        iterations: list[Iteration] = []
        uses = 0
        # past max_uses the executor hears an error; a model that keeps asking is answered at most this often
        rounds_left = (spec.max_uses if spec.max_uses is not None else s.policy.config.max_consults) + 2
        while True:
            resp = None
            hidden: set[int] = set()
            async for d in self._upstream(
                s, acting, purpose, _with(request, messages=messages), stream=stream
            ):
                if isinstance(d, StreamEnd):  # the last item: the generator ends after it
                    resp = d.response
                    continue
                if isinstance(d, ToolCallDelta):
                    if d.id is not None and d.name == ADVISOR_TOOL:
                        hidden.add(d.index)
                    if d.index in hidden:
                        continue  # the advisor call is shown as a server_tool_use block instead
                yield d
            assert resp is not None
            iterations.append(Iteration("message", resp.usage, resp.model or acting.endpoint.config.model))
            call = next((c for c in resp.message.tool_calls if c.name == ADVISOR_TOOL), None)
            if call is None or rounds_left <= 0:
                if call is not None:  # asked once too often: the turn ends here, without the call
                    others = [c for c in resp.message.tool_calls if c.name != ADVISOR_TOOL]
                    finish = resp.finish_reason if others else "stop"
                    resp = replace(
                        resp, message=replace(resp.message, tool_calls=others), finish_reason=finish
                    )
                end = IterationEnd(resp, None)
                segments.append(end)
                yield end
                break
            rounds_left -= 1
            sid = server_tool_id()
            # the turn ends at the advisor call: other calls of the same turn are the executor's to make again
            asked = replace(
                resp.message, tool_calls=[replace(call, id=sid, arguments={}, raw_arguments="{}")]
            )
            end = IterationEnd(replace(resp, message=replace(resp.message, tool_calls=[])), sid)
            segments += [end, AdvisorCall(sid)]
            yield end
            yield AdvisorCall(sid)
            if spec.max_uses is not None and uses >= spec.max_uses:
                result = AdvisorResult(sid, None, MAX_USES)
                s.policy.skipped += 1
                self.store.record_consult(s, Consult("tool", "skipped", s.requests, "max_uses"))
            else:
                uses += 1
                task = asyncio.ensure_future(
                    self._tool_consult(s, advisor, [*messages, asked], request, spec, sid)
                )
                try:
                    if stream:
                        yield Ping()
                        while not task.done():
                            await asyncio.wait([task], timeout=PING_EVERY_S)
                            if not task.done():
                                yield Ping()
                    result, iteration = await task
                finally:
                    task.cancel()
                if iteration is not None:
                    iterations.append(iteration)
            segments.append(result)
            yield result
            messages += [
                asked,
                Message.tool(
                    sid,
                    ADVISOR_TOOL,
                    result_text(result.text, result.error_code),
                    result.error_code is not None,
                ),
            ]
            self._check_budget(s)
        final = AdvisedResponse(
            resp.message,
            Usage(),
            resp.model,
            resp.finish_reason,
            resp.latency_s,
            resp.attempts,
            segments=segments,
            iterations=iterations,
        )
        final.usage = final.executor_usage
        yield StreamEnd(final)

    async def _tool_consult(
        self,
        s: Session,
        advisor: Slot,
        messages: list[Message],
        request: ChatRequest,
        spec: AdvisorToolSpec,
        sid: str,
    ) -> tuple[AdvisorResult, Iteration | None]:
        """One advisor call through the consult core (trigger `tool`), booked and journaled; a refusal
        or a failure is an error result, never a failed request."""
        goal = next((m.text for m in reversed(messages) if m.role == "user" and m.text.strip()), "")
        brief = ConsultBrief(
            "tool",
            goal=goal[:4000],
            tools=[t.name for t in request.tools or [] if t.name != ADVISOR_TOOL],
            digest=transcript_digest(messages),
            failures=s.policy.consecutive,
        )
        try:
            done = await consult(
                brief,
                policy=s.policy,
                frontier=advisor,
                ledger=s.ledger,
                max_usd=self.config.budget.max_usd,
                conversation=messages,
                call=lambda req: self._call(s, advisor, "consult", req),
                max_tokens=spec.max_tokens,
            )
        except ProxyError as e:
            code = _advisor_error(e)
            self.store.record_consult(s, Consult("tool", "error", s.requests, code), error=e.message)
            return AdvisorResult(sid, None, code), None
        if done.advice is None:  # skipped: max_consults or the session's budget
            reason = done.outcome.skip_reason
            self.store.record_consult(
                s, Consult("tool", "skipped", s.requests, reason), estimated_cost_usd=done.estimate_usd
            )
            return AdvisorResult(sid, None, MAX_USES if reason == "max_consults" else UNAVAILABLE), None
        consult_ = Consult("tool", "advice", s.requests, None, done.cost_usd)
        self.store.record_consult(
            s, consult_, estimated_cost_usd=done.estimate_usd, advice=done.advice[:2000]
        )
        resp = done.response
        assert resp is not None
        return AdvisorResult(sid, done.advice), Iteration(
            "advisor_message", resp.usage, resp.model or advisor.endpoint.config.model
        )


def _advisor_error(e: ProxyError) -> str:
    """Anthropic's error code for a failed advisor call."""
    text = e.message.lower()
    if "429" in text or "rate limit" in text:
        return TOO_MANY
    if "529" in text or "overloaded" in text:
        return OVERLOADED
    if "prompt is too long" in text or "context length" in text or "too many tokens" in text:
        return TOO_LONG
    return UNAVAILABLE
