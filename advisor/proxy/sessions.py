"""Conversations the proxy has seen: their escalation state and ledger, kept in memory and in an
append-only journal (`journal.jsonl` in the sessions directory) that a restarted proxy replays.

Each request appends its model calls (`call`), consults (`consult`), the policy's failure counts
(`step_failed`, written by `EscalationPolicy.failure` itself) and the session's state after it (`state`),
written together before the reply goes out (`commit`; `advisor.proxy.journal` says what survives what).
Replay keeps the last state and every call, so a session resumes where it was. Sessions idle past
`ttl_s`, or beyond `max_sessions` (least recently used first), expire; a restart compacts the journal
to the live sessions (written beside it, then renamed over it) and each UTC day's spend.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from advisor.escalation import EscalationPolicy, TurnState
from advisor.ledger import CallRecord, Ledger
from advisor.messages import Message, Usage
from advisor.pricing import Price
from advisor.proxy.config import ProxyEscalation
from advisor.proxy.journal import Journal

JOURNAL = "journal.jsonl"


_DAY: list = [-1, ""]  # (UTC day number, its date): formatting a date at every call was a hot spot


def today(t: float | None = None) -> str:
    t = time.time() if t is None else t
    day = int(t // 86400)
    if day != _DAY[0]:
        _DAY[:] = [day, datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")]
    return _DAY[1]


def session_key(messages: list[Message]) -> str:
    """A stable id for a conversation whose client names none: its system prompt and first user message."""
    system = "\n".join(m.text for m in messages if m.role == "system")
    first = next((m for m in messages if m.role == "user"), None)
    h = hashlib.sha256(system.encode())
    h.update(b"\x00")
    if first is not None:
        h.update(first.text.encode())
        for image in first.images:
            h.update(hashlib.sha256(image.data).digest())
    return "h-" + h.hexdigest()[:20]


@dataclass
class Consult:
    trigger: str
    kind: str  # skipped | advice | takeover
    request: int  # the session's request number it happened at
    skip_reason: str | None = None
    cost_usd: float = 0.0


@dataclass
class Session:
    id: str
    policy: EscalationPolicy
    ledger: Ledger
    turn: TurnState = field(default_factory=TurnState)
    created: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    requests: int = 0
    seen: int = 0  # messages of the conversation already read for failure signals
    inserts: list[tuple[int, str]] = field(default_factory=list)  # (position, text) notes for the models
    consults: list[Consult] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def state(self) -> dict:
        p = self.policy
        return {
            "requests": self.requests,
            "seen": self.seen,
            "inserts": self.inserts,
            "consecutive": p.consecutive,
            "consults": p.consults,
            "skipped": p.skipped,
            "failed_calls": dict(p.calls.failures),
            "last_ok": p.calls.last_ok,
            "takeover_left": self.turn.takeover_left,
            "frontier_acted": self.turn.frontier_acted,
            "last_seen": self.last_seen,
        }

    def restore(self, s: dict) -> None:
        p = self.policy
        self.requests, self.seen = s["requests"], s["seen"]
        self.inserts = [(int(i), str(t)) for i, t in s["inserts"]]
        p.consecutive, p.consults, p.skipped = s["consecutive"], s["consults"], s["skipped"]
        failed = s["failed_calls"]  # call -> failures (a list of calls, each failed once, before the counts)
        p.calls.failures = Counter(failed if isinstance(failed, dict) else dict.fromkeys(failed, 1))
        p.calls.last_ok = s["last_ok"]
        self.turn.takeover_left, self.turn.frontier_acted = s["takeover_left"], s["frontier_acted"]
        self.last_seen = s["last_seen"]


class _SessionTrace:
    """What `EscalationPolicy.failure` writes to: the journal, tagged with the session."""

    def __init__(self, store: SessionStore, session: str):
        self.store, self.session = store, session

    def emit(self, type_: str, **fields: Any) -> dict:
        return self.store.emit(type_, session=self.session, **fields)


class SessionStore:
    """Sessions by id, bounded, persisted in `directory/journal.jsonl` (None: memory only)."""

    def __init__(
        self,
        escalation: ProxyEscalation,
        frontier_price: Price | None,
        *,
        has_frontier: bool,
        directory: Path | None = None,
        ttl_s: float = 7 * 86400,
        max_sessions: int = 10000,
        fsync: bool = True,
        read_only: bool = False,
    ):
        self.escalation = escalation
        self.frontier_price = frontier_price
        self.has_frontier = has_frontier
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.day_usd: dict[str, float] = {}
        self.reserved_usd = 0.0  # estimated cost of calls in flight (the daily cap counts them)
        self.in_flight = 0
        self.expired = 0
        # metered calls not yet known to be in the database (their start, and cost once settled)
        self.metered: dict[str, dict] = {}
        self._last_sweep = time.time()
        self.directory = directory
        self._journal: Journal | None = None
        if directory is not None:
            path = directory / JOURNAL
            if path.is_file():
                self._replay(path)
            if not read_only:
                directory.mkdir(parents=True, exist_ok=True)
                self._compact(path)
                self._journal = Journal(path, fsync=fsync)

    # -- sessions ----------------------------------------------------------------------------
    def _new(self, sid: str, created: float | None = None) -> Session:
        s = Session(
            sid,
            EscalationPolicy(self.escalation, enabled=self.has_frontier),
            Ledger(frontier_price=self.frontier_price),
        )
        if created is not None:
            s.created = s.last_seen = created
        return s

    def get(self, sid: str) -> tuple[Session, bool]:
        """The session `sid` (created when new: then the flag is True), marked as just used."""
        now = time.time()
        if now - self._last_sweep > min(60.0, self.ttl_s):
            self.sweep(now)
        s = self.sessions.get(sid)
        if s is not None and now - s.last_seen > self.ttl_s:
            self._expire(sid, "ttl")
            s = None
        created = s is None
        if s is None:
            s = self._new(sid)
            self.sessions[sid] = s
            self.emit("session", session=sid)
            while len(self.sessions) > self.max_sessions:
                self._expire(next(iter(self.sessions)), "max_sessions")
        self.sessions.move_to_end(sid)
        s.last_seen = now
        return s, created

    def sweep(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._last_sweep = now
        for sid in [
            k for k, s in self.sessions.items() if now - s.last_seen > self.ttl_s and not s.lock.locked()
        ]:
            self._expire(sid, "ttl")

    def _expire(self, sid: str, reason: str) -> None:
        self.sessions.pop(sid, None)
        self.expired += 1
        self.emit("expired", session=sid, reason=reason)

    def trace_for(self, session: Session) -> _SessionTrace:
        return _SessionTrace(self, session.id)

    # -- money -------------------------------------------------------------------------------
    def spent_today(self) -> float:
        return self.day_usd.get(today(), 0.0)

    def record_call(
        self,
        session: Session,
        role: str,
        endpoint: str,
        purpose: str,
        usage: Usage,
        price: Price,
        **extra: Any,
    ) -> float:
        rec = session.ledger.record(role, endpoint, purpose, usage, price)
        day = today()
        self.day_usd[day] = self.day_usd.get(day, 0.0) + rec.cost_usd
        self.emit(
            "call",
            session=session.id,
            role=role,
            endpoint=endpoint,
            purpose=purpose,
            usage=usage.as_dict(),
            cost_usd=rec.cost_usd,
            day=day,
            **extra,
        )
        return rec.cost_usd

    def record_consult(self, session: Session, consult: Consult, **extra: Any) -> None:
        session.consults.append(consult)
        self.emit("consult", session=session.id, **consult.__dict__, **extra)

    def save(self, session: Session) -> None:
        """The session's state after a request, committed with the request's other events."""
        self.emit("state", session=session.id, state=session.state())
        self.commit()

    # -- the journal -------------------------------------------------------------------------
    def emit(self, type_: str, **fields: Any) -> dict:
        """Queues an event for the journal; it is written at the next `commit`."""
        if self._journal is None:
            return {"type": type_, **fields}
        return self._journal.emit(type_, **fields)

    def commit(self) -> None:
        """Writes the queued events (see `advisor.proxy.journal` for what that guarantees): called
        before anything that depends on them reaches a client."""
        if self._journal is not None:
            self._journal.commit()

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def _replay(self, path: Path) -> None:
        now = time.time()
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by a crash: the state before it stands
                self._apply(ev, n)
        for sid in [k for k, s in self.sessions.items() if now - s.last_seen > self.ttl_s]:
            del self.sessions[sid]
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)

    def _apply(self, ev: dict, line: int) -> None:
        kind, sid = ev.get("type"), ev.get("session")
        # metered calls (advisor.proxy.auth): the journal holds each one's start and end until a proxy
        # has checked that the database has them (`metered_synced`: everything before it is there)
        if kind == "call_start":
            self.metered[ev["id"]] = ev
            return
        if kind == "call_settled":
            if ev["id"] in self.metered:
                self.metered[ev["id"]] = {**self.metered[ev["id"]], "cost": ev.get("cost")}
            return
        if kind == "metered_synced":
            self.metered.clear()
            return
        if kind == "day":
            self.day_usd[ev["day"]] = self.day_usd.get(ev["day"], 0.0) + ev["usd"]
            return
        if not isinstance(sid, str):
            return
        if kind == "expired":
            self.sessions.pop(sid, None)
            return
        s = self.sessions.get(sid)
        if s is None:
            s = self.sessions[sid] = self._new(sid, ev.get("created", ev.get("t")))
        self.sessions.move_to_end(sid)
        if kind == "call":
            usage = Usage(**ev["usage"])
            s.ledger.calls.append(
                CallRecord(ev["role"], ev["endpoint"], ev["purpose"], usage, ev["cost_usd"])
            )
            day = ev.get("day") or today(ev.get("t"))
            if not ev.get("compacted"):
                self.day_usd[day] = self.day_usd.get(day, 0.0) + ev["cost_usd"]
        elif kind == "consult":
            fields = {k: ev.get(k) for k in ("trigger", "kind", "request", "skip_reason", "cost_usd")}
            s.consults.append(Consult(**fields))
        elif kind == "state":
            s.restore(ev["state"])

    def _compact(self, path: Path) -> None:
        """Rewrites the journal as the live sessions' events and the days' totals."""
        if not path.is_file():
            return
        tmp = path.with_name(JOURNAL + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:

            def put(ev: dict) -> None:
                fh.write(json.dumps(ev, default=str, ensure_ascii=False) + "\n")

            for ev in self.metered.values():  # kept until the database is known to have them
                put(ev)
            for day, usd in sorted(self.day_usd.items()):
                put({"type": "day", "day": day, "usd": usd})
            for sid, s in self.sessions.items():
                put({"type": "session", "session": sid, "created": s.created, "t": s.created})
                for c in s.ledger.calls:
                    put(
                        {
                            "type": "call",
                            "session": sid,
                            "role": c.role,
                            "endpoint": c.endpoint,
                            "purpose": c.purpose,
                            "usage": c.usage.as_dict(),
                            "cost_usd": c.cost_usd,
                            "compacted": True,  # already inside the day totals above
                        }
                    )
                for c in s.consults:
                    put({"type": "consult", "session": sid, **c.__dict__})
                put({"type": "state", "session": sid, "state": s.state()})
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
