"""The proxy's database on SQLite and on a real PostgreSQL (a throwaway cluster): a key's budget is
reserved atomically across replicas, a dead replica's calls in flight are booked at their estimate, and
the whole proxy under 40 concurrent sessions survives a `kill -9`: a restart on SQLite, the other replica
on PostgreSQL; every upstream call is booked and the key's budget overruns by at most the calls in flight."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import sqlalchemy as sa
import yaml

from advisor.proxy.store import BudgetExceeded, Store, calls, spend
from advisor.testing import Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage
from tests.advisor.pg_cluster import pg_cluster
from tests.advisor.proxy_helpers import EXEC_PRICE, make_config

MASTER_ENV, MASTER = "ADVISOR_TEST_MASTER_KEY", "sk-master-" + "q" * 40
DB_ENV = "ADVISOR_TEST_DB_URL"


@pytest.fixture(scope="module")
def pg_url():
    with pg_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'proxy.db'}"
    url = request.getfixturevalue("pg_url")
    return url


async def _wipe(url: str) -> None:
    s = await Store(url).open(serve=False)
    async with s.engine.begin() as conn:
        for t in ("advisor_calls", "advisor_key_spend", "advisor_keys", "advisor_replicas"):
            await conn.execute(sa.text(f"DELETE FROM {t}"))
    await s.close()


async def test_two_replicas_never_both_spend_a_keys_last_dollar(db_url):
    await _wipe(db_url)
    a = await Store(db_url).open()
    b = await Store(db_url).open()
    try:

        async def one(store: Store, i: int):
            try:
                return await store.start(
                    key="k",
                    max_usd=1.0,
                    period="total",
                    session=f"s{i}",
                    role="executor",
                    model="m",
                    estimate=0.125,
                )
            except BudgetExceeded:
                return None

        got = await asyncio.gather(*(one(a if i % 2 else b, i) for i in range(60)))
        tickets = [t for t in got if t is not None]
        # spent + reserved < max admits a call: 8 reservations of 0.125 reach 1.0, none more
        assert len(tickets) == 8
        for t in tickets:
            a.settle(t, 0.0625)
        await a.close()  # commits what is queued
        ok = [await one(b, 100 + i) for i in range(30)]  # 0.5 spent: 4 more fit
        assert sum(t is not None for t in ok) == 4
    finally:
        await b.close()


async def test_a_dead_replicas_calls_in_flight_are_booked_at_their_estimate(db_url):
    await _wipe(db_url)
    dead = await Store(db_url, stale_replica_s=0.5).open()
    t = await dead.start(
        key="k", max_usd=None, period="total", session="s", role="executor", model="m", estimate=0.25
    )
    assert t is not None
    # dies: its tasks stop, its connections drop, nothing is settled or cleaned up
    dead._writer.cancel()
    dead._timer.cancel()
    await dead.engine.dispose()
    await asyncio.sleep(0.6)
    live = await Store(db_url, stale_replica_s=0.5).open()  # SQLite at once; PostgreSQL once silent 0.5 s
    try:
        rows = await live.fetch(sa.select(calls.c.state, calls.c.cost_usd))
        assert [(r.state, r.cost_usd) for r in rows] == [("estimated", 0.25)]
        (row,) = await live.fetch(sa.select(spend.c.spent_usd, spend.c.reserved_usd))
        assert (row.spent_usd, row.reserved_usd) == (0.25, 0.0)
        assert live.orphans_booked == 1
    finally:
        await live.close()


# -- the whole proxy, killed mid-run -----------------------------------------------------------
SESSIONS = 40
REPLY = ScriptedUsage(1000, 100)
PER_CALL = (1000 * EXEC_PRICE.input + 100 * EXEC_PRICE.output) / 1e6
BUDGET_CALLS = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    def __init__(self, config, env):
        self.config, self.env, self.port = config, env, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Replica:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "advisor.cli",
                "proxy",
                "--config",
                str(self.config),
                "--port",
                str(self.port),
            ],
            env=self.env,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def _write_config(upstream, tmp, name: str, storage: dict) -> object:
    d = tmp / name
    d.mkdir()
    cfg = make_config(
        upstream,
        d,
        auth={"master_key_env": MASTER_ENV, "refresh_s": 0.5},
        storage=storage,
        budget={"max_usd": 100.0},
        escalation={"after_failures": 2},
    )
    path = d / "proxy.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    return path


async def _run_sessions(replicas: list[Replica], key: str, on_progress) -> dict:
    """40 sessions, each sending requests round-robin over the live replicas until its key's budget
    refuses it (402); connection failures (a killed replica) move on to the next."""
    counts = {"ok": 0, "refused": 0, "failed": 0, "other": 0}
    costs: dict[str, list[float]] = {f"s{i}": [] for i in range(SESSIONS)}
    live = list(replicas)
    headers = {"Authorization": f"Bearer {key}"}

    async def session(i: int, client: httpx.AsyncClient) -> None:
        sid, n = f"s{i}", i
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            r = live[n % len(live)]
            n += 1
            body = {
                "model": "advisor",
                "max_tokens": 100,
                "messages": [{"role": "user", "content": f"task {i} via {r.port}"}],
            }
            try:
                resp = await client.post(
                    r.url + "/v1/chat/completions", json=body, headers={**headers, "x-advisor-session": sid}
                )
            except httpx.HTTPError:
                counts["failed"] += 1
                await asyncio.sleep(0.05)
                continue
            if resp.status_code == 200:
                counts["ok"] += 1
                costs[sid].append(float(resp.headers["x-advisor-cost-usd"]))
                await on_progress(counts, live)
            elif resp.status_code == 402:
                assert "budget" in resp.json()["error"]["message"]
                counts["refused"] += 1
                return
            else:
                counts["other"] += 1
                await asyncio.sleep(0.05)
        raise AssertionError(f"session {sid} never reached the budget")

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
        await asyncio.gather(*(session(i, client) for i in range(SESSIONS)))
    return {"counts": counts, "costs": costs}


async def _booked(url: str) -> dict:
    store = await Store(url).open(serve=False)
    try:
        rows = await store.fetch(
            sa.select(calls.c.state, sa.func.count().label("n"), sa.func.sum(calls.c.cost_usd).label("usd"))
            .where(calls.c.key_name == "team")
            .group_by(calls.c.state)
        )
        (sp,) = await store.fetch(
            sa.select(spend.c.spent_usd, spend.c.reserved_usd).where(spend.c.key_name == "team")
        )
        return {
            "by_state": {r.state: (r.n, r.usd) for r in rows},
            "spent": sp.spent_usd,
            "reserved": sp.reserved_usd,
        }
    finally:
        await store.close()


def _make_key(replica: Replica) -> str:
    r = httpx.post(
        replica.url + "/admin/keys",
        json={"name": "team", "max_usd": PER_CALL * BUDGET_CALLS, "period": "day"},
        headers={"Authorization": f"Bearer {MASTER}"},
    )
    assert r.status_code == 201, r.text
    return r.json()["key"]


def _check(upstream, booked: dict, run: dict) -> None:
    states = booked["by_state"]
    assert "started" not in states, states  # every call in flight at the kill is booked
    # the kill caught calls in flight (40 sessions, each waiting 0.1 s on the upstream): booked at estimate
    assert states.get("estimated", (0, 0))[0] >= 1, states
    n_booked = sum(n for n, _ in states.values())
    upstream_calls = len(upstream.requests_for("flash"))
    # every call that reached the upstream (spent there) is booked; none is booked twice
    assert upstream_calls <= n_booked <= upstream_calls + SESSIONS
    assert run["counts"]["ok"] <= n_booked
    budget = PER_CALL * BUDGET_CALLS
    # the budget overruns by at most the calls in flight (one per session)
    assert budget <= booked["spent"] + PER_CALL <= budget + SESSIONS * PER_CALL
    assert booked["reserved"] == pytest.approx(0.0, abs=1e-12)
    assert run["counts"]["refused"] == SESSIONS


class Hold:
    """Holds, at the upstream, the calls sent through one replica until that replica is killed: so the kill
    surely catches a call in flight (to be booked at its estimate), however busy the machine is."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.caught, self.released = threading.Event(), threading.Event()

    def reply(self, body: dict) -> Reply:
        if self.port is not None and f"via {self.port}" in json.dumps(body) and not self.released.is_set():
            self.caught.set()
            self.released.wait(120)
        return Reply("ok", usage=REPLY, delay_s=0.1)

    async def kill_mid_call(self, replica) -> None:
        self.port = replica.port
        assert await asyncio.to_thread(self.caught.wait, 120), "no call reached the upstream through it"
        replica.kill()
        self.released.set()


@pytest.fixture
def hold() -> Hold:
    return Hold()


@pytest.fixture
def upstream(hold):
    with ScriptedServer() as server:
        server.script("flash", hold.reply)
        yield server


@pytest.mark.slow
async def test_sqlite_one_replica_killed_and_restarted_under_40_sessions(
    upstream, hold, tmp_path, monkeypatch
):
    monkeypatch.setenv(MASTER_ENV, MASTER)
    config = _write_config(upstream, tmp_path, "a", {})
    env = {**os.environ, "ADVISOR_CONFIG_DIR": str(tmp_path / "no-config")}
    proxy = await asyncio.to_thread(Replica(config, env).start)
    key = _make_key(proxy)
    killed = []

    async def on_progress(counts, live) -> None:
        if not killed and counts["ok"] >= BUDGET_CALLS // 3:
            killed.append(counts["ok"])
            await hold.kill_mid_call(proxy)  # mid-run: 40 sessions with calls in flight, one surely upstream
            await asyncio.to_thread(proxy.start)  # the same port, the same sessions dir

    try:
        run = await _run_sessions([proxy], key, on_progress)
    finally:
        proxy.stop()
    assert killed and run["counts"]["failed"] > 0
    booked = await _booked(f"sqlite:///{tmp_path / 'a' / 'sessions' / 'proxy.db'}")
    _check(upstream, booked, run)
    # the sessions went on where they were: each one's ledger (the cost header) never went back
    for sid, seen in run["costs"].items():
        assert seen == sorted(seen), sid


@pytest.mark.slow
async def test_postgresql_two_replicas_one_killed_under_40_sessions(
    upstream, hold, tmp_path, monkeypatch, pg_url
):
    await _wipe(pg_url)
    monkeypatch.setenv(MASTER_ENV, MASTER)
    monkeypatch.setenv(DB_ENV, pg_url)
    storage = {"url_env": DB_ENV, "stale_replica_s": 1.0}
    env = {**os.environ, "ADVISOR_CONFIG_DIR": str(tmp_path / "no-config")}
    a = Replica(_write_config(upstream, tmp_path, "a", storage), env)
    b = Replica(_write_config(upstream, tmp_path, "b", storage), env)
    await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
    key = _make_key(a)  # made on one replica, used on both
    killed = []

    async def on_progress(counts, live) -> None:
        if not killed and counts["ok"] >= BUDGET_CALLS // 3:
            killed.append(counts["ok"])
            live.remove(a)  # no new calls to it; one of its calls is held upstream until the kill
            await hold.kill_mid_call(a)

    try:
        run = await _run_sessions([a, b], key, on_progress)
        deadline = time.monotonic() + 30  # b books a's calls in flight once a is silent stale_replica_s
        while "started" in (booked := await _booked(pg_url))["by_state"]:
            assert time.monotonic() < deadline, booked
            await asyncio.sleep(0.2)
    finally:
        a.kill()
        b.stop()
    assert killed
    _check(upstream, booked, run)
    # each session's ledger moved between the replicas and on to b alone: its cost never went back
    for sid, seen in run["costs"].items():
        assert seen == sorted(seen), sid


def test_a_sessions_escalation_state_moves_between_replicas_on_postgresql(tmp_path, monkeypatch, pg_url):
    """Two replicas on one database, requests alternating between them as a load balancer sends them:
    the failure streak counted on one replica triggers the consult on the other, whose advice then
    reaches the executor on the first; the session's ledger is whole on both."""
    from tests.advisor.proxy_helpers import proxy_for
    from tests.advisor.test_proxy import _failing_conversation, oa

    asyncio.run(_wipe(pg_url))
    monkeypatch.setenv(MASTER_ENV, MASTER)
    monkeypatch.setenv(DB_ENV, pg_url)
    with ScriptedServer() as upstream:
        upstream.script("flash", lambda body: Reply(tool_calls=[ScriptedToolCall("bash", {"cmd": "pytest"})]))
        upstream.script("big", [Reply(text="look at conftest.py first", usage=ScriptedUsage(500, 50))])
        cfgs = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            cfgs.append(
                make_config(
                    upstream,
                    tmp_path / name,
                    escalation={"after_failures": 2, "mode": "advise"},
                    auth={"master_key_env": MASTER_ENV},
                    storage={"url_env": DB_ENV},
                )
            )
        with proxy_for(cfgs[0]) as a, proxy_for(cfgs[1]) as b:
            h = {"x-advisor-session": "fix", "Authorization": f"Bearer {MASTER}"}
            r0 = httpx.post(a.base_url + "/chat/completions", json=oa(_failing_conversation(0)), headers=h)
            r1 = httpx.post(b.base_url + "/chat/completions", json=oa(_failing_conversation(1)), headers=h)
            r2 = httpx.post(a.base_url + "/chat/completions", json=oa(_failing_conversation(2)), headers=h)
            assert [r.status_code for r in (r0, r1, r2)] == [200, 200, 200]
            assert "x-advisor-consult" not in r0.headers and "x-advisor-consult" not in r1.headers
            assert r2.headers["x-advisor-consult"] == "failures=advice"  # one failure on b, one on a
            r3 = httpx.post(b.base_url + "/chat/completions", json=oa(_failing_conversation(2)), headers=h)
            # b took the advice inserted on a, and the session's cost so far (3 calls and the consult)
            assert float(r3.headers["x-advisor-cost-usd"]) >= float(r2.headers["x-advisor-cost-usd"]) > 0
        execs = upstream.requests_for("flash")
        assert len(execs) == 4 and "look at conftest.py first" in json.dumps(execs[3].body["messages"])
        assert len(upstream.requests_for("big")) == 1


def test_an_old_journal_is_imported_into_the_database_once(tmp_path, monkeypatch, pg_url):
    from tests.advisor.proxy_helpers import proxy_for
    from tests.advisor.test_proxy import oa

    asyncio.run(_wipe(pg_url))
    monkeypatch.setenv(MASTER_ENV, MASTER)
    monkeypatch.setenv(DB_ENV, pg_url)
    with ScriptedServer() as upstream:
        upstream.script("flash", lambda body: Reply("ok", usage=REPLY))
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        old = make_config(upstream, tmp_path / "a")  # before the database: the journal alone
        body = oa([{"role": "user", "content": "hi"}])
        with proxy_for(old) as p:
            for _ in range(3):
                before = httpx.post(
                    p.base_url + "/chat/completions", json=body, headers={"x-advisor-session": "old"}
                )
        spent = float(before.headers["x-advisor-cost-usd"])
        shared = {"auth": {"master_key_env": MASTER_ENV}, "storage": {"url_env": DB_ENV}}
        h = {"x-advisor-session": "old", "Authorization": f"Bearer {MASTER}"}
        for _ in range(2):  # the second start finds the session there and imports nothing
            with proxy_for(make_config(upstream, tmp_path / "a", **shared)):
                pass
        with proxy_for(make_config(upstream, tmp_path / "b", **shared)) as other:  # never saw the journal
            after = httpx.post(other.base_url + "/chat/completions", json=body, headers=h)
        assert float(after.headers["x-advisor-cost-usd"]) == pytest.approx(spent + PER_CALL)

    async def rows():
        s = await Store(pg_url).open(serve=False)
        try:
            return await s.fetch(sa.select(calls.c.replica, calls.c.cost_usd).where(calls.c.session == "old"))
        finally:
            await s.close()

    got = asyncio.run(rows())
    assert sorted(r.replica == "journal" for r in got) == [False, True, True, True]
