"""The journal's durability: what a client was told is written before it is told, so a proxy killed
mid-work (SIGKILL: no shutdown, no final flush) restarts with every call its clients saw."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from advisor.messages import Usage
from advisor.proxy.journal import Journal
from advisor.proxy.sessions import JOURNAL
from advisor.testing import Reply, ScriptedServer, ScriptedUsage
from tests.advisor.proxy_helpers import EXEC_PRICE, fast_router, make_config


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_events_are_written_at_commit_in_one_go_and_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "j" / JOURNAL
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (writes.append(bytes(data)), real_write(fd, data))[1])
    j = Journal(path, fsync=True, fsync_interval_s=0.0)
    j.emit("a", x=1)
    j.emit("b", x=2)
    assert path.read_text() == ""  # queued, not yet written
    j.commit()
    assert [e["type"] for e in _lines(path)] == ["a", "b"] and len(writes) == 1
    deadline = time.monotonic() + 5
    while not synced and time.monotonic() < deadline:  # the background fsync follows the commit
        time.sleep(0.01)
    assert synced
    j.emit("c")
    j.close()  # close commits what is queued
    assert [e["seq"] for e in _lines(path)] == [0, 1, 2]
    j.commit()  # a closed journal ignores further commits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def upstream():
    with ScriptedServer() as server:
        yield server


def test_a_killed_proxy_restarts_with_every_call_its_clients_saw(upstream, tmp_path):
    upstream.script("flash", lambda body: Reply("ok", usage=ScriptedUsage(100, 20)))
    cfg = make_config(upstream, tmp_path, sessions={"fsync": True})
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    port = _free_port()
    env = {**os.environ, "ADVISOR_CONFIG_DIR": str(tmp_path / "no-config")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "advisor.cli", "proxy", "--config", str(config), "--port", str(port)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/models", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "the proxy did not start"
                time.sleep(0.1)
        conv = {"model": "advisor", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"x-advisor-session": "kept"}
        costs = []
        for stream in (False, True, False):
            with httpx.stream(
                "POST", f"{base}/chat/completions", json={**conv, "stream": stream}, headers=headers
            ) as r:
                r.read()
                assert r.status_code == 200
            costs.append(float(r.headers["x-advisor-cost-usd"]))
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown: only what was written before each reply counts
        proc.wait(timeout=30)
    router = fast_router(cfg)
    try:
        kept = router.store.sessions["kept"]
        call = EXEC_PRICE.cost(Usage(input=100, output=20))
        assert kept.requests == 3 and len(kept.ledger.calls) == 3
        # the last reply's cost header is the running cost after its call: the journal has all of it
        assert kept.ledger.total_usd == pytest.approx(costs[-1]) == pytest.approx(3 * call)
    finally:
        router.store.close()
