"""Who may use the proxy, and what each key may spend: `Gate`.

With `auth:` in proxy.yaml every route but /health needs a key, sent the way the client's SDK sends it
(`Authorization: Bearer`, or `x-api-key` for Anthropic's): the master key (every route, `/` and
`/admin/keys` only with it) or a virtual key (the chat routes, /v1/models, count_tokens). A virtual key
is checked in memory: its hash under the pepper is looked up among the keys read from the database
(re-read every `auth.refresh_s`, and on a miss, so a key made by the CLI works at once and a revocation
on one replica reaches the others within that interval), then compared in constant time; revoked and
expired keys, models outside the key's globs and requests past its `rpm` (per replica, a sliding
minute: 429 with Retry-After) are refused in the client's wire format.

Spend: the router calls `start_call` before each upstream call (the key's budget is checked and the
call's estimate reserved atomically in the database, `advisor.proxy.store`) and `settle` after it. Which
key a call is for travels in a context variable set by the app for the request (`CURRENT`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import fnmatch
import hmac
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from advisor.engine.serving.auth import key_in_query, key_matches, presented_key
from advisor.ledger import CallRecord
from advisor.messages import Usage
from advisor.proxy.config import ProxyConfig
from advisor.proxy.keys import KeyRecord, all_keys, hash_key, key_by_hash, pepper_from
from advisor.proxy.router import ProxyError
from advisor.proxy.sessions import Consult, Session, SessionStore
from advisor.proxy.store import BudgetExceeded, Store, Ticket, period_id, spend

log = logging.getLogger("advisor.proxy")
MASTER = "(master)"


@dataclass(frozen=True)
class Principal:
    """Who made a request: the master key, a virtual key, or anyone (auth off)."""

    name: str | None
    key: KeyRecord | None = None

    @property
    def master(self) -> bool:
        return self.name == MASTER


ANYONE = Principal(None)
CURRENT: contextvars.ContextVar[Principal] = contextvars.ContextVar("advisor_proxy_principal", default=ANYONE)


class Refused(Exception):
    """A request the gate turns away: status, the wire's error kind, one line, maybe Retry-After."""

    def __init__(self, status: int, kind: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.retry_after = status, kind, message, retry_after


def store_for(config: ProxyConfig, **kw) -> Store:
    url_env = config.storage.url_env
    if url_env:
        url = os.environ.get(url_env)
        if not url:
            raise ValueError(f"storage.url_env: environment variable {url_env} is not set")
        return Store(url, stale_replica_s=config.storage.stale_replica_s, **kw)
    config.sessions_dir.mkdir(parents=True, exist_ok=True)
    return Store.sqlite_file(
        config.sessions_dir / config.storage.file, stale_replica_s=config.storage.stale_replica_s, **kw
    )


def pepper_for(config: ProxyConfig) -> bytes:
    assert config.auth is not None
    master = os.environ.get(config.auth.master_key_env, "")
    if not master:
        raise ValueError(f"auth.master_key_env: environment variable {config.auth.master_key_env} is not set")
    return pepper_from(master, os.environ.get(config.auth.pepper_env) if config.auth.pepper_env else None)


class Gate:
    def __init__(self, config: ProxyConfig, store: Store | None = None):
        self.config = config
        auth = config.auth
        self.enabled = auth is not None
        self.master_key = os.environ.get(auth.master_key_env, "") if auth else ""
        if auth is not None and not self.master_key:
            raise ValueError(f"auth.master_key_env: environment variable {auth.master_key_env} is not set")
        self.pepper = pepper_for(config) if auth else b""
        self.store = (
            store
            if store is not None
            else (store_for(config) if self.enabled or config.storage.url_env else None)
        )
        self._by_hash: dict[str, KeyRecord] = {}
        self._recent: dict[str, collections.deque[float]] = {}
        self._accounts: dict[tuple[str, str | None], list[float]] = {}
        self.journal: SessionStore | None = None  # the router's (set by the app): call starts go there too
        self._versions: dict[str, int] = {}
        self._saving: set[asyncio.Task] = set()  # the session versions this replica last wrote or read
        self._refresher: asyncio.Task | None = None
        self._opened = False

    # -- life --------------------------------------------------------------------------------
    async def open(self) -> None:
        if self.store is None or self._opened:
            return
        await self.store.open(book_orphans=False)
        self._opened = True
        await self.book_journaled()  # first: the journal may know what a started call really cost
        await self.store.book_orphans(0.0 if self.store.sqlite else self.store.stale_replica_s)
        await self.refresh()
        if self.enabled:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="advisor-keys-refresh")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self.store is not None and self._opened:
            await self.store.close()
            self._opened = False

    async def refresh(self) -> None:
        if self.store is not None and self.enabled:
            self._by_hash = {k.key_hash: k for k in await all_keys(self.store)}

    async def _refresh_loop(self) -> None:
        assert self.config.auth is not None
        while True:
            await asyncio.sleep(self.config.auth.refresh_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("advisor proxy: re-reading the keys failed")

    # -- who is asking -----------------------------------------------------------------------
    async def admit(self, scope: dict, *, master_only: bool = False) -> Principal:
        """The request's principal, or Refused (401: no or a bad key; 403: not the master key where
        one is needed; 429: over the key's rpm)."""
        if not self.enabled:
            return ANYONE
        if key_in_query(scope.get("query_string", b"")):
            raise Refused(
                401,
                "authentication_error",
                "advisor proxy: an API key in the URL is refused (URLs end up in logs); send it as "
                "Authorization: Bearer or x-api-key",
            )
        given = presented_key(scope["headers"])
        if given is None:
            raise Refused(
                401,
                "authentication_error",
                "advisor proxy: no API key; send Authorization: Bearer or x-api-key",
            )
        if key_matches(given, self.master_key):
            return Principal(MASTER)
        if master_only:
            raise Refused(403, "permission_error", "advisor proxy: this route needs the master key")
        digest = hash_key(given, self.pepper)
        record = self._by_hash.get(digest)
        if record is None and self.store is not None:
            record = await key_by_hash(self.store, digest)  # made since the last refresh
            if record is not None:
                self._by_hash[digest] = record
        if record is None or not hmac.compare_digest(record.key_hash, digest):
            raise Refused(401, "authentication_error", "advisor proxy: invalid API key")
        now = time.time()
        state = record.state(now)
        if state != "active":
            raise Refused(401, "authentication_error", f"advisor proxy: key '{record.name}' is {state}")
        if record.rpm is not None:
            self._rate(record, now)
        return Principal(record.name, record)

    def _rate(self, record: KeyRecord, now: float) -> None:
        recent = self._recent.setdefault(record.name, collections.deque())
        while recent and now - recent[0] >= 60.0:
            recent.popleft()
        assert record.rpm is not None
        if len(recent) >= record.rpm:
            wait = max(1, math.ceil(60.0 - (now - recent[0])))
            raise Refused(
                429,
                "rate_limit_error",
                f"advisor proxy: key '{record.name}' is over its rate limit ({record.rpm} requests per minute); "
                f"retry in {wait} s",
                retry_after=wait,
            )
        recent.append(now)

    @staticmethod
    def check_model(principal: Principal, model: str) -> None:
        key = principal.key
        if key is not None and key.models and not any(fnmatch.fnmatchcase(model, g) for g in key.models):
            raise Refused(
                403,
                "permission_error",
                f"advisor proxy: key '{key.name}' may not use model '{model}' (it may use {', '.join(key.models)})",
            )

    # -- the router's meter ------------------------------------------------------------------
    async def _account(self, key: str, pid: str) -> list[float]:
        """[spent, reserved] of a key's period, kept in memory on the single-replica path."""
        acct = self._accounts.get((key, pid))
        if acct is None:
            assert self.store is not None
            rows = await self.store.fetch(
                sa.select(spend.c.spent_usd, spend.c.reserved_usd).where(
                    spend.c.key_name == key, spend.c.period_id == pid
                )
            )
            acct = self._accounts.setdefault((key, pid), [rows[0].spent_usd, 0.0] if rows else [0.0, 0.0])
        return acct

    async def start_call(self, session, role: str, model: str, estimate: float) -> Ticket | None:
        """Before an upstream call: the key's budget checked, the estimate reserved, the start recorded.

        One replica (SQLite): the process's memory is the authority, so the check and reservation are
        in memory and the start goes to the journal (one write(2), committed before the upstream call:
        a kill -9 cannot lose it) and to the database with the writer's next batch. Replicas
        (PostgreSQL): a conditional UPDATE in the database, committed before the call."""
        if self.store is None:
            return None
        principal = CURRENT.get()
        key = principal.key
        name = key.name if key is not None else principal.name
        try:
            if not self.store.sqlite:
                ticket = await self.store.start(
                    key=name,
                    max_usd=key.max_usd if key is not None else None,
                    period=key.period if key is not None else "total",
                    session=session.id,
                    role=role,
                    model=model,
                    estimate=estimate,
                )
                self._journal_start(ticket, session.id, role, model)
                return ticket
            pid = period_id(key.period if key is not None else "total")
            ticket = Ticket(uuid.uuid4().hex, name, pid if name is not None else None, estimate)
            if name is not None:
                acct = await self._account(name, pid)
                if key is not None and key.max_usd is not None and acct[0] + acct[1] >= key.max_usd:
                    raise BudgetExceeded(name, key.max_usd, acct[0], acct[1], pid)
                acct[1] += estimate
            self._journal_start(ticket, session.id, role, model)
            self.store.start_later(ticket, session=session.id, role=role, model=model)
            return ticket
        except BudgetExceeded as e:
            when = {"day": "today (UTC)", "month": "this month (UTC)"}.get(
                key.period if key else "", "in total"
            )
            raise ProxyError(
                402,
                "budget_exceeded",
                f"advisor proxy: key '{e.key}' reached its budget: spent ${e.spent:.6f} {when} "
                f"(plus ${e.reserved:.6f} in flight) of max_usd {e.max_usd:g}; raise it with "
                f"`advisor proxy keys update {e.key} --max-usd ...`",
                session,
            ) from None

    def _journal_start(self, ticket: Ticket, session: str, role: str, model: str) -> None:
        if self.journal is None:
            return
        self.journal.emit(
            "call_start",
            id=ticket.id,
            key=ticket.key,
            period_id=ticket.period_id,
            session=session,
            role=role,
            model=model,
            estimate=ticket.estimate,
        )
        self.journal.commit()

    def settle(self, ticket: Ticket | None, cost: float, error: str | None = None, **call) -> None:
        if ticket is None or self.store is None:
            return
        if self.store.sqlite and ticket.key is not None:
            acct = self._accounts.get((ticket.key, ticket.period_id))
            if acct is not None:
                acct[0] += cost
                acct[1] = max(0.0, acct[1] - ticket.estimate)
        if self.journal is not None:  # committed with the call's own events, before its reply
            self.journal.emit("call_settled", id=ticket.id, cost=cost)
        self.store.settle(ticket, cost, error, **call)

    async def book_journaled(self) -> None:
        """A restarted proxy: the calls its journal has and the database may not (those whose batch
        the writer had not committed at a kill) are booked: at their cost when the journal saw them
        end, else at their estimate. Then the journal is told they are all in."""
        if self.store is None or self.journal is None or not self.journal.metered:
            return
        await self.store.book_journaled(list(self.journal.metered.values()))
        self.journal.metered.clear()
        self.journal.emit("metered_synced")
        self.journal.commit()

    # -- sessions shared by replicas ---------------------------------------------------------
    @property
    def shares_sessions(self) -> bool:
        """On PostgreSQL a session's escalation state lives in the database, so any replica can take
        its next request; on SQLite (one replica) the journal keeps it, as without a database."""
        return self.store is not None and not self.store.sqlite

    async def load_session(self, session: Session) -> bool:
        """Bring the session up to the database's state when another replica moved it on; True when
        the database knows the session (so its next request is not its first)."""
        if not self.shares_sessions:
            return False
        assert self.store is not None
        row = await self.store.session_row(session.id)
        if row is None:
            return False
        if row.version == self._versions.get(session.id):
            return True
        saved = json.loads(row.state)
        session.restore(saved["state"])
        session.consults = [Consult(**c) for c in saved["consults"]]
        session.created = row.created_at
        session.ledger.calls = [
            CallRecord(
                c.role, c.endpoint or "", c.purpose or "", Usage(**json.loads(c.usage or "{}")), c.cost_usd
            )
            for c in await self.store.session_calls(session.id)
        ]
        self._versions[session.id] = row.version
        return True

    async def import_sessions(self, journal_sessions: SessionStore) -> int:
        """Sessions a replica's journal (journal.jsonl, from before the database) knows and the
        database does not: written to it with their calls, once (a second start finds them there)."""
        if not self.shares_sessions or not journal_sessions.sessions:
            return 0
        assert self.store is not None
        known = await self.store.known_sessions(list(journal_sessions.sessions))
        n = 0
        for sid, s in list(journal_sessions.sessions.items()):
            if sid in known:
                continue
            state = {"state": s.state(), "consults": [c.__dict__ for c in s.consults]}
            await self.store.import_session(sid, state, s.created, s.ledger.calls)
            n += 1
        if n:
            log.warning("advisor proxy: imported %d sessions from %s into the database", n, "journal.jsonl")
        return n

    def save_session_later(self, session: Session) -> None:
        if self.shares_sessions:
            task = asyncio.get_running_loop().create_task(self.save_session(session))
            self._saving.add(task)
            task.add_done_callback(self._saving.discard)

    async def save_session(self, session: Session) -> None:
        if not self.shares_sessions:
            return
        assert self.store is not None
        state = {"state": session.state(), "consults": [c.__dict__ for c in session.consults]}
        await self.store.flush()  # the request's settled calls first: the ledger a replica loads is whole
        self._versions[session.id] = await self.store.save_session(session.id, state, session.created)
