"""The proxy's database: virtual keys (hashes only), each key's spend per budget period, and a record of
every metered upstream call. SQLAlchemy Core on an async driver: SQLite (aiosqlite) by default, a file
under sessions.dir in WAL mode; PostgreSQL (asyncpg) when replicas share it. Values always go in as
bound parameters.

Writes go through one writer task per process holding one connection: whatever is queued while a
transaction commits goes into the next one (a group commit), so a busy proxy commits a batch of calls
at a time instead of one transaction per call, and SQLite never sees two writers of its own. A call is
written twice: `start` (before the upstream call: the key's budget is checked and the call's estimated
cost reserved in one conditional UPDATE, which is atomic across replicas, and a "started" call record
is inserted) and `settle` (after it: the real cost booked, the reservation released). A call whose
process died in between stays "started"; a restarted proxy (SQLite) or any live replica, once the dead
one has been silent `stale_replica_s` (PostgreSQL), books it at its estimate, state "estimated".

Durability: `start` returns after its transaction commits, so no upstream call is made that the
database does not know of. SQLite runs with synchronous=NORMAL in WAL mode: a killed process loses
nothing committed; a power loss can lose the last commits (the journal's ~50 ms promise, as WAL
checkpoints sync). `settle` is queued, committed within the writer's next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

log = logging.getLogger("advisor.proxy.store")

meta = sa.MetaData()
keys = sa.Table(
    "advisor_keys",
    meta,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("hint", sa.String(16), nullable=False),  # the key's first characters, to tell keys apart
    sa.Column("max_usd", sa.Float, nullable=True),
    sa.Column("period", sa.String(8), nullable=False, default="total"),
    sa.Column("rpm", sa.Integer, nullable=True),
    sa.Column("models", sa.Text, nullable=False, default=""),  # comma-separated globs; empty: any
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_used_at", sa.Float, nullable=True),
)
spend = sa.Table(
    "advisor_key_spend",
    meta,
    sa.Column("key_name", sa.String(200), primary_key=True),
    sa.Column("period_id", sa.String(16), primary_key=True),  # total | d:YYYY-MM-DD | m:YYYY-MM (UTC)
    sa.Column("spent_usd", sa.Float, nullable=False, default=0.0),
    sa.Column("reserved_usd", sa.Float, nullable=False, default=0.0),  # estimates of calls in flight
)
calls = sa.Table(
    "advisor_calls",
    meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("key_name", sa.String(200), nullable=True, index=True),
    sa.Column("period_id", sa.String(16), nullable=True),
    sa.Column("session", sa.String(200), nullable=False, index=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("estimate_usd", sa.Float, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=True),
    sa.Column("state", sa.String(12), nullable=False, index=True),  # started | settled | estimated
    sa.Column("replica", sa.String(32), nullable=False, index=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("endpoint", sa.String(200), nullable=True),
    sa.Column("purpose", sa.String(16), nullable=True),
    sa.Column("usage", sa.Text, nullable=True),  # JSON: the Usage's token counts
)
sessions = sa.Table(
    "advisor_sessions",
    meta,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("state", sa.Text, nullable=False),  # JSON: Session.state() and its consults
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),  # bumped by every save: a replica reloads when it moved
)
replicas = sa.Table(
    "advisor_replicas",
    meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
)

PERIODS = ("day", "month", "total")
HEARTBEAT_S = 5.0
# SQLite: what nobody waits for (settlements, starts, which the journal holds) is committed in a batch
# at most this long after it is queued: the journal's fsync interval, the same durability (PostgreSQL's
# writer commits at once: replicas read the settlements)
LINGER_S = 0.05
LAST_USED_S = 1.0  # a key's last use is written at most this often (a statement per call otherwise)


def period_id(period: str, t: float | None = None) -> str:
    if period == "total":
        return "total"
    d = datetime.fromtimestamp(time.time() if t is None else t, UTC)
    return d.strftime("d:%Y-%m-%d") if period == "day" else d.strftime("m:%Y-%m")


def database_url(url: str) -> str:
    """A user's URL with the async driver this store uses (postgresql:// -> postgresql+asyncpg://)."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+asyncpg://" + url[len(plain) :]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    return url


class BudgetExceeded(Exception):
    def __init__(self, key: str, max_usd: float, spent: float, reserved: float, period: str):
        self.key, self.max_usd, self.spent, self.reserved, self.period = key, max_usd, spent, reserved, period
        super().__init__(key)


@dataclass
class Ticket:
    """A started call: what `settle` needs to book it."""

    id: str
    key: str | None
    period_id: str | None
    estimate: float


Op = Callable[[AsyncConnection], Awaitable[Any]]


class Store:
    def __init__(self, url: str, *, stale_replica_s: float = 30.0, replica: str | None = None):
        self.url = database_url(url)
        self.sqlite = self.url.startswith("sqlite")
        self.stale_replica_s = stale_replica_s
        self.replica = replica or uuid.uuid4().hex
        self.engine: AsyncEngine | None = None
        self._queue: asyncio.Queue[tuple[Op, asyncio.Future | None]] | None = None
        self._writer: asyncio.Task | None = None
        self._timer: asyncio.Task | None = None
        self.orphans_booked = 0
        # what the writer's next `_flush` writes: call rows not yet inserted, settlements of inserted
        # ones, spend deltas per (key, period), keys' last use
        self._rows: dict[str, dict] = {}
        self._settles: dict[str, tuple] = {}
        self._deltas: dict[tuple[str, str | None], list[float]] = {}
        self._used: dict[str, float] = {}
        self._used_written: dict[str, float] = {}
        self._flush_queued = False

    @classmethod
    def sqlite_file(cls, path: Path, **kw) -> Store:
        return cls(f"sqlite+aiosqlite:///{path}", **kw)

    # -- life --------------------------------------------------------------------------------
    async def open(self, *, serve: bool = True, book_orphans: bool = True) -> Store:
        """Connect and create the tables; with `serve`, register as a replica, book dead replicas' calls
        in flight and start the writer (a CLI that only reads or edits keys passes serve=False)."""
        if self.sqlite:
            self.engine = create_async_engine(self.url, connect_args={"timeout": 30})

            @sa.event.listens_for(self.engine.sync_engine, "connect")
            def _pragmas(dbapi_conn, _record) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()
        else:
            # a fixed pool: an overflow connection is opened for one use and closed after it, and a
            # PostgreSQL connection costs milliseconds of CPU to open (40 sessions kept opening them)
            self.engine = create_async_engine(self.url, pool_size=24, max_overflow=0, pool_timeout=60)
        async with self.engine.begin() as conn:
            await conn.run_sync(meta.create_all)
        if serve:
            now = time.time()
            async with self.engine.begin() as conn:
                await conn.execute(
                    sa.insert(replicas).values(id=self.replica, started_at=now, heartbeat_at=now)
                )
            if book_orphans:  # SQLite has one replica: whatever another process left started is an orphan
                await self.book_orphans(0.0 if self.sqlite else self.stale_replica_s)
            self._queue = asyncio.Queue()
            self._writer = asyncio.create_task(self._write_loop(), name="advisor-store-writer")
            self._timer = asyncio.create_task(self._heartbeats(), name="advisor-store-heartbeat")
        return self

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        if self._writer is not None and self._queue is not None:
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            self._queue.put_nowait((_noop, done))  # everything queued before it is committed
            with contextlib.suppress(Exception):
                await done
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            with contextlib.suppress(Exception):
                async with self.engine.begin() as conn:  # a clean exit: no orphans left to book
                    await conn.execute(sa.delete(replicas).where(replicas.c.id == self.replica))
        self._writer = self._timer = self._queue = None
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    # -- the writer --------------------------------------------------------------------------
    async def write(self, op: Op) -> Any:
        """Run `op` in the writer's next transaction; returns its result once committed. On PostgreSQL,
        which takes concurrent writers, an awaited write runs at once in a transaction of its own on a
        pooled connection (one writer connection serialised 40 sessions' reservations behind each
        other's round trips); only SQLite, one writer at a time, funnels every write through the task."""
        assert self._queue is not None, "the store is not open for writing"
        if not self.sqlite:
            assert self.engine is not None
            async with self.engine.begin() as conn:
                return await op(conn)
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, fut))
        return await fut

    def write_later(self, op: Op) -> None:
        """Queue `op` for a transaction within `LINGER_S` without waiting for it (what it records is
        in the journal already, or may wait that long)."""
        if self._queue is not None:
            self._queue.put_nowait((op, None))

    async def _write_loop(self) -> None:
        assert self.engine is not None and self._queue is not None
        queue = self._queue
        while True:
            batch = [await queue.get()]
            if batch[0][1] is None and self.sqlite:  # nobody waits on it: gather what comes within the linger
                deadline = time.monotonic() + LINGER_S
                while (left := deadline - time.monotonic()) > 0 and len(batch) < 512:
                    try:
                        batch.append(await asyncio.wait_for(queue.get(), left))
                    except TimeoutError:
                        break
                    if batch[-1][1] is not None:
                        break  # someone waits: commit now
            while not queue.empty() and len(batch) < 512:
                batch.append(queue.get_nowait())
            try:
                results = await self._run(batch)
            except Exception:  # one op failed: the batch again, each op in its own transaction
                results = []
                for item in batch:
                    try:
                        results.append((True, (await self._run([item]))[0][1]))
                    except Exception as e:
                        log.exception("advisor proxy: a database write failed")
                        results.append((False, e))
            for (_, fut), (ok, value) in zip(batch, results, strict=True):
                if fut is not None and not fut.done():
                    fut.set_result(value) if ok else fut.set_exception(value)

    async def _run(self, batch: list[tuple[Op, asyncio.Future | None]]) -> list[tuple[bool, Any]]:
        assert self.engine is not None
        results: list[tuple[bool, Any]] = []
        async with self.engine.begin() as conn:
            for op, _ in batch:
                try:
                    results.append((True, await op(conn)))
                except BudgetExceeded as e:  # an answer, not a failure: the rest of the batch stands
                    results.append((False, e))
        return results

    async def _heartbeats(self) -> None:
        # several beats per stale interval, so a live replica is never taken for a dead one
        interval = min(HEARTBEAT_S, self.stale_replica_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.write(self._beat)
                if not self.sqlite:
                    await self.book_orphans(self.stale_replica_s)
            except Exception:
                log.exception("advisor proxy: the database heartbeat failed")

    async def _beat(self, conn: AsyncConnection) -> None:
        await conn.execute(
            sa.update(replicas).where(replicas.c.id == self.replica).values(heartbeat_at=time.time())
        )

    # -- calls -------------------------------------------------------------------------------
    async def start(
        self,
        *,
        key: str | None,
        max_usd: float | None,
        period: str,
        session: str,
        role: str,
        model: str,
        estimate: float,
    ) -> Ticket:
        """Reserve `estimate` against the key's budget (BudgetExceeded when it is spent or reserved
        already) and record the call as started; returns once committed."""
        pid = period_id(period) if key is not None else None
        ticket = Ticket(uuid.uuid4().hex, key, pid, estimate)
        now = time.time()

        if (
            not self.sqlite
            and key is not None
            and await self._start_at_once(ticket, max_usd, session, role, model, now)
        ):
            return ticket

        async def op(conn: AsyncConnection) -> Ticket:
            if key is not None:
                await self._reserve(conn, key, pid, estimate, max_usd)
            await conn.execute(
                sa.insert(calls).values(
                    id=ticket.id,
                    key_name=key,
                    period_id=pid,
                    session=session,
                    role=role,
                    model=model,
                    estimate_usd=estimate,
                    state="started",
                    replica=self.replica,
                    started_at=now,
                )
            )
            return ticket

        return await self.write(op)

    async def _start_at_once(
        self, t: Ticket, max_usd: float | None, session: str, role: str, model: str, now: float
    ) -> bool:
        """PostgreSQL, the usual case (the period's row exists, the budget has room): the reservation
        and the call's record in one statement, one round trip (WITH r AS (UPDATE ... RETURNING)
        INSERT ... SELECT FROM r). False when it reserved nothing: then the transaction path decides
        (the period's first call, or a budget that is spent)."""
        row = spend.c
        cond = sa.and_(row.key_name == t.key, row.period_id == t.period_id)
        if max_usd is not None:
            cond = sa.and_(cond, row.spent_usd + row.reserved_usd < max_usd)
        r = (
            sa.update(spend)
            .where(cond)
            .values(reserved_usd=row.reserved_usd + t.estimate)
            .returning(row.key_name)
            .cte("reserved")
        )
        values = {
            "id": t.id,
            "key_name": t.key,
            "period_id": t.period_id,
            "session": session,
            "role": role,
            "model": model,
            "estimate_usd": t.estimate,
            "state": "started",
            "replica": self.replica,
            "started_at": now,
        }
        picked = sa.select(*(sa.literal(v, calls.c[k].type).label(k) for k, v in values.items())).select_from(
            r
        )
        stmt = sa.insert(calls).from_select(list(values), picked).add_cte(r)
        assert self.engine is not None
        async with self.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            return (await conn.execute(stmt)).rowcount == 1

    def start_later(self, ticket: Ticket, *, session: str, role: str, model: str) -> None:
        """The single-replica path (SQLite): the budget was checked in memory and the start is in the
        journal already; the database records it with the writer's next batch (`_flush`), in which a
        call that has ended by then is inserted settled, never as started."""
        self._rows[ticket.id] = {
            "id": ticket.id,
            "key_name": ticket.key,
            "period_id": ticket.period_id,
            "session": session,
            "role": role,
            "model": model,
            "estimate_usd": ticket.estimate,
            "cost_usd": None,
            "state": "started",
            "replica": self.replica,
            "started_at": time.time(),
            "ended_at": None,
            "error": None,
            "endpoint": None,
            "purpose": None,
            "usage": None,
        }
        if ticket.key is not None:
            self._delta(ticket.key, ticket.period_id)[1] += ticket.estimate
        self._schedule()

    def _delta(self, key: str, pid: str | None) -> list[float]:
        d = self._deltas.get((key, pid))
        if d is None:
            d = self._deltas[(key, pid)] = [0.0, 0.0]
        return d

    def _schedule(self) -> None:
        if not self._flush_queued and self._queue is not None:
            self._flush_queued = True
            self.write_later(self._flush)

    async def _flush(self, conn: AsyncConnection) -> None:
        """One batch's calls, settlements and spend: one multi-row insert, then an update per key."""
        self._flush_queued = False
        rows, settles, deltas, used = self._rows, self._settles, self._deltas, self._used
        self._rows, self._settles, self._deltas, self._used = {}, {}, {}, {}
        try:
            if rows:
                await conn.execute(sa.insert(calls), list(rows.values()))
            for cid, (fields, key, pid, cost, estimate) in settles.items():
                done = await conn.execute(
                    sa.update(calls).where(calls.c.id == cid, calls.c.state == "started").values(**fields)
                )
                if done.rowcount == 1 and key is not None:  # not booked meanwhile as an orphan
                    d = deltas.setdefault((key, pid), [0.0, 0.0])
                    d[0] += cost
                    d[1] -= estimate
            for (key, pid), (spent_delta, reserved_delta) in deltas.items():
                add = (
                    sa.update(spend)
                    .where(spend.c.key_name == key, spend.c.period_id == pid)
                    .values(
                        spent_usd=spend.c.spent_usd + spent_delta,
                        reserved_usd=_floor0(spend.c.reserved_usd + reserved_delta),
                    )
                )
                if (await conn.execute(add)).rowcount == 0:  # the period's first: its row, then again
                    await conn.execute(_insert_ignore(conn, spend, key_name=key, period_id=pid))
                    await conn.execute(add)
            for key, t in used.items():
                await conn.execute(sa.update(keys).where(keys.c.name == key).values(last_used_at=t))
        except BaseException:  # the batch is retried: what it took goes back
            for cid, row in rows.items():
                self._rows.setdefault(cid, row)
            self._settles = {**settles, **self._settles}
            for k, (a, b) in deltas.items():
                d = self._delta(*k)
                d[0] += a
                d[1] += b
            self._used = {**used, **self._used}
            raise

    async def book_journaled(self, metered: list[dict]) -> int:
        """Calls from a journal (`call_start` events, with `cost` once they ended): those the database
        lacks are inserted (settled at their cost, or at their estimate when they never ended), and
        those it has as started but the journal saw end are settled at their cost. Returns how many."""
        if not metered:
            return 0
        states: dict[str, str] = {}
        ids = [e["id"] for e in metered]
        for i in range(0, len(ids), 500):
            q = sa.select(calls.c.id, calls.c.state).where(calls.c.id.in_(ids[i : i + 500]))
            states.update((r.id, r.state) for r in await self.fetch(q))
        booked = 0

        async def op(conn: AsyncConnection) -> None:
            nonlocal booked
            now = time.time()
            for e in metered:
                state, cost, key, pid = states.get(e["id"]), e.get("cost"), e.get("key"), e.get("period_id")
                reserved = 0.0
                if state is None:
                    await conn.execute(
                        sa.insert(calls).values(
                            id=e["id"],
                            key_name=key,
                            period_id=pid,
                            session=e["session"],
                            role=e["role"],
                            model=e["model"],
                            estimate_usd=e["estimate"],
                            cost_usd=e["estimate"] if cost is None else cost,
                            state="estimated" if cost is None else "settled",
                            replica="journal",
                            started_at=e.get("t", now),
                            ended_at=now,
                        )
                    )
                elif state == "started" and cost is not None:
                    await conn.execute(
                        sa.update(calls)
                        .where(calls.c.id == e["id"], calls.c.state == "started")
                        .values(cost_usd=cost, state="settled", ended_at=now)
                    )
                    reserved = e["estimate"]
                else:
                    continue  # in the database already (or started with no end: book_orphans' part)
                booked += 1
                if key is not None:
                    await conn.execute(_insert_ignore(conn, spend, key_name=key, period_id=pid))
                    await self._book(conn, key, pid, e["estimate"] if cost is None else cost, reserved)

        await self.write(op)
        self.orphans_booked += booked
        return booked

    @staticmethod
    async def _reserve(
        conn: AsyncConnection, key: str, pid: str, estimate: float, max_usd: float | None
    ) -> None:
        row = spend.c
        where = sa.and_(row.key_name == key, row.period_id == pid)
        for _ in range(2):
            cond = where if max_usd is None else sa.and_(where, row.spent_usd + row.reserved_usd < max_usd)
            done = await conn.execute(
                sa.update(spend).where(cond).values(reserved_usd=row.reserved_usd + estimate)
            )
            if done.rowcount == 1:
                return
            got = (await conn.execute(sa.select(row.spent_usd, row.reserved_usd).where(where))).first()
            if got is not None:
                assert max_usd is not None
                raise BudgetExceeded(key, max_usd, got.spent_usd, got.reserved_usd, pid)
            # the period's first call: its row, then the conditional update again (a replica that
            # inserted it meanwhile makes this insert a no-op)
            await conn.execute(_insert_ignore(conn, spend, key_name=key, period_id=pid))
        raise RuntimeError(f"the spend row of key {key} for {pid} could not be created")

    def settle(
        self,
        ticket: Ticket,
        cost: float,
        error: str | None = None,
        *,
        usage: dict | None = None,
        endpoint: str | None = None,
        purpose: str | None = None,
    ) -> None:
        """Book the call's real cost and release its reservation (committed with the writer's next batch)."""
        now = time.time()
        fields = {"cost_usd": cost, "state": "settled", "ended_at": now, "error": error}
        fields.update(
            endpoint=endpoint, purpose=purpose, usage=json.dumps(usage) if usage is not None else None
        )
        row = self._rows.get(ticket.id)
        if row is not None:  # its start is not in the database yet: it goes in settled
            row.update(fields)
            if ticket.key is not None:
                d = self._delta(ticket.key, ticket.period_id)
                d[0] += cost
                d[1] -= ticket.estimate
        else:
            self._settles[ticket.id] = (fields, ticket.key, ticket.period_id, cost, ticket.estimate)
        if ticket.key is not None and now - self._used_written.get(ticket.key, 0.0) >= LAST_USED_S:
            self._used[ticket.key] = self._used_written[ticket.key] = now  # "last use" to the second
        self._schedule()

    @staticmethod
    async def _book(conn: AsyncConnection, key: str, pid: str | None, cost: float, estimate: float) -> None:
        row = spend.c
        await conn.execute(
            sa.update(spend)
            .where(row.key_name == key, row.period_id == pid)
            .values(
                spent_usd=row.spent_usd + cost,
                reserved_usd=_floor0(row.reserved_usd - estimate),
            )
        )

    async def book_orphans(self, silent_s: float) -> int:
        """Book the started calls of replicas silent for `silent_s` (not this one) at their estimate."""
        assert self.engine is not None
        cutoff = time.time() - silent_s
        booked = 0
        async with self.engine.begin() as conn:
            dead = [
                r.id
                for r in await conn.execute(
                    sa.select(replicas.c.id).where(
                        replicas.c.id != self.replica, replicas.c.heartbeat_at <= cutoff
                    )
                )
            ]
            dead_set = set(dead)
            # also calls of replicas that left no row (a crash before the first heartbeat committed)
            known = {r.id for r in await conn.execute(sa.select(replicas.c.id))}
            started = (
                await conn.execute(
                    sa.select(
                        calls.c.id, calls.c.key_name, calls.c.period_id, calls.c.estimate_usd, calls.c.replica
                    ).where(calls.c.state == "started", calls.c.replica != self.replica)
                )
            ).all()
            now = time.time()
            for c in started:
                if c.replica not in dead_set and c.replica in known:
                    continue
                done = await conn.execute(
                    sa.update(calls)
                    .where(calls.c.id == c.id, calls.c.state == "started")
                    .values(state="estimated", cost_usd=c.estimate_usd, ended_at=now)
                )
                if done.rowcount == 1:  # not booked by another replica meanwhile
                    booked += 1
                    if c.key_name is not None:
                        await self._book(conn, c.key_name, c.period_id, c.estimate_usd, c.estimate_usd)
            if dead:
                await conn.execute(sa.delete(replicas).where(replicas.c.id.in_(dead)))
        self.orphans_booked += booked
        if booked:
            log.warning(
                "advisor proxy: booked %d calls left in flight by a stopped proxy at their estimate", booked
            )
        return booked

    # -- sessions (shared by replicas) -------------------------------------------------------
    async def session_row(self, sid: str) -> sa.Row | None:
        rows = await self.fetch(sa.select(sessions).where(sessions.c.id == sid))
        return rows[0] if rows else None

    async def session_calls(self, sid: str) -> list[sa.Row]:
        """The session's booked calls, in the order they started."""
        return await self.fetch(
            sa.select(calls)
            .where(calls.c.session == sid, calls.c.state != "started")
            .order_by(calls.c.started_at)
        )

    async def save_session(self, sid: str, state: dict, created: float) -> int:
        """Write the session's state (an upsert that bumps its version); returns the new version."""
        body = json.dumps(state, default=str)

        async def op(conn: AsyncConnection) -> int:
            now = time.time()
            if conn.dialect.name == "postgresql":
                from sqlalchemy.dialects.postgresql import insert
            else:
                from sqlalchemy.dialects.sqlite import insert
            stmt = insert(sessions).values(id=sid, state=body, created_at=created, updated_at=now, version=1)
            stmt = stmt.on_conflict_do_update(
                index_elements=[sessions.c.id],
                set_={"state": body, "updated_at": now, "version": sessions.c.version + 1},
            ).returning(sessions.c.version)
            return (await conn.execute(stmt)).scalar_one()

        if not self.sqlite:  # one statement: in autocommit, one round trip
            assert self.engine is not None
            async with self.engine.connect() as conn:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                return await op(conn)
        return await self.write(op)

    async def known_sessions(self, ids: list[str]) -> set[str]:
        known: set[str] = set()
        for i in range(0, len(ids), 500):
            rows = await self.fetch(sa.select(sessions.c.id).where(sessions.c.id.in_(ids[i : i + 500])))
            known.update(r.id for r in rows)
        return known

    async def import_session(self, sid: str, state: dict, created: float, ledger: list) -> None:
        """A session from a journal, with its calls (booked, keyless: the journal knew no keys)."""
        now = time.time()

        async def op(conn: AsyncConnection) -> None:
            await conn.execute(
                sa.insert(sessions).values(
                    id=sid,
                    state=json.dumps(state, default=str),
                    created_at=created,
                    updated_at=now,
                    version=1,
                )
            )
            for i, c in enumerate(ledger):
                await conn.execute(
                    sa.insert(calls).values(
                        id=uuid.uuid4().hex,
                        session=sid,
                        role=c.role,
                        model=c.endpoint,
                        endpoint=c.endpoint,
                        purpose=c.purpose,
                        usage=json.dumps(c.usage.as_dict()),
                        estimate_usd=c.cost_usd,
                        cost_usd=c.cost_usd,
                        state="settled",
                        replica="journal",
                        started_at=created + i * 1e-6,  # their order
                        ended_at=created + i * 1e-6,
                    )
                )

        await self.write(op)

    # -- reads -------------------------------------------------------------------------------
    async def flush(self) -> None:
        """Commit what is queued now (before a read that shows spend: a report, a key listing; on
        PostgreSQL before a session's state is saved, so a replica that loads it finds its calls)."""
        if self._queue is not None:
            fut = asyncio.get_running_loop().create_future()
            self._queue.put_nowait((_noop, fut))
            await fut

    async def fetch(self, query: sa.Executable) -> list[sa.Row]:
        """A read, in autocommit on PostgreSQL (no BEGIN and ROLLBACK round trips around it)."""
        assert self.engine is not None
        async with self.engine.connect() as conn:
            if not self.sqlite:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            return list((await conn.execute(query)).all())

    async def execute(self, statement: sa.Executable) -> int:
        """One statement in its own transaction (key administration); returns the rows it touched."""
        if self._queue is not None:
            return await self.write(lambda conn: _rowcount(conn, statement))
        assert self.engine is not None
        async with self.engine.begin() as conn:
            return await _rowcount(conn, statement)

    async def spent(self, key: str, period: str) -> tuple[float, float]:
        rows = await self.fetch(
            sa.select(spend.c.spent_usd, spend.c.reserved_usd).where(
                spend.c.key_name == key, spend.c.period_id == period_id(period)
            )
        )
        return (rows[0].spent_usd, rows[0].reserved_usd) if rows else (0.0, 0.0)

    async def spend_by(self, *columns: str) -> list[dict]:
        """Booked spend (settled and estimated calls) grouped by calls' columns (key_name, session, model)."""
        await self.flush()
        cols = [calls.c[c] for c in columns]
        booked = calls.c.state != "started"
        q = (
            sa.select(
                *cols,
                sa.func.count().label("calls"),
                sa.func.coalesce(sa.func.sum(sa.case((booked, calls.c.cost_usd), else_=0.0)), 0.0).label(
                    "usd"
                ),
                sa.func.coalesce(
                    sa.func.sum(sa.case((calls.c.state == "estimated", calls.c.cost_usd), else_=0.0)), 0.0
                ).label("estimated_usd"),
                sa.func.sum(sa.case((calls.c.state == "started", 1), else_=0)).label("in_flight"),
            )
            .group_by(*cols)
            .order_by(*cols)
        )
        return [dict(r._mapping) for r in await self.fetch(q)]


def _floor0(expr):
    # reservations never go below zero (a settle after an orphan booking, rounding)
    return sa.case((expr < 0, 0.0), else_=expr)


async def _noop(conn: AsyncConnection) -> None:
    return None


async def _rowcount(conn: AsyncConnection, statement: sa.Executable) -> int:
    return (await conn.execute(statement)).rowcount


def _insert_ignore(conn: AsyncConnection, table: sa.Table, **values: Any) -> sa.Executable:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).values(spent_usd=0.0, reserved_usd=0.0, **values).on_conflict_do_nothing()
