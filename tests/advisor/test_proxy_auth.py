"""The proxy's keys, driven by the official `openai` and `anthropic` SDKs against a real proxy on
127.0.0.1: the master key, virtual keys made over /admin/keys and by `advisor proxy keys`, their
budgets, rate limits, model globs, expiry and revocation, each refused in its wire's error shape; the
request size limit; no key in any file the proxy writes."""

from __future__ import annotations

import hmac
import json
import os
import subprocess
import sys
import time

import anthropic
import httpx
import openai
import pytest
import yaml

from advisor.testing import Reply, ScriptedServer, ScriptedUsage
from tests.advisor.proxy_helpers import EXEC_PRICE, make_config, proxy_for

MASTER_ENV = "ADVISOR_TEST_MASTER_KEY"
MASTER = "sk-master-" + "m7" * 20
MSGS = [{"role": "user", "content": "hello"}]


@pytest.fixture
def upstream():
    with ScriptedServer() as server:
        server.script("flash", lambda body: Reply("ok", usage=ScriptedUsage(1000, 100)))
        yield server


@pytest.fixture
def cfg(upstream, tmp_path, monkeypatch):
    monkeypatch.setenv(MASTER_ENV, MASTER)
    return make_config(upstream, tmp_path, auth={"master_key_env": MASTER_ENV, "refresh_s": 0.2})


def oa(proxy, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=key or "none", max_retries=0)


def an(proxy, key: str | None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.root_url, api_key=key or "none", max_retries=0)


def chat(proxy, key, model="advisor"):
    return oa(proxy, key).chat.completions.create(model=model, messages=MSGS)


def message(proxy, key, model="claude-x"):
    return an(proxy, key).messages.create(model=model, max_tokens=50, messages=MSGS)


def admin(proxy, method: str, path: str, key: str = MASTER, **kw) -> httpx.Response:
    return httpx.request(method, proxy.root_url + path, headers={"Authorization": f"Bearer {key}"}, **kw)


def make_key(proxy, name: str, **fields) -> str:
    r = admin(proxy, "POST", "/admin/keys", json={"name": name, **fields})
    assert r.status_code == 201, r.text
    return r.json()["key"]


def test_no_key_or_a_wrong_key_is_a_401_in_each_wire_shape_and_health_is_open(cfg):
    with proxy_for(cfg) as proxy:
        for key in (None, "wrong", MASTER[:-1], MASTER + "x"):
            with pytest.raises(openai.AuthenticationError) as e:
                chat(proxy, key)
            assert e.value.body["type"] == "authentication_error"
            with pytest.raises(anthropic.AuthenticationError) as e:
                message(proxy, key)
            assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
        raw = httpx.post(proxy.base_url + "/chat/completions", json={"model": "advisor", "messages": MSGS})
        assert raw.status_code == 401 and "no API key" in raw.json()["error"]["message"]
        for path in ("/v1/models", "/"):
            assert httpx.get(proxy.root_url + path).status_code == 401
        assert httpx.get(proxy.root_url + "/health").json()["ok"] is True


def test_the_master_key_works_on_both_wires_and_a_key_in_the_url_is_refused(cfg):
    with proxy_for(cfg) as proxy:
        assert chat(proxy, MASTER).choices[0].message.content == "ok"
        assert message(proxy, MASTER).content[0].text == "ok"
        assert httpx.get(proxy.root_url + "/", headers={"x-api-key": MASTER}).status_code == 200
        for params in ({"api_key": MASTER}, {"key": MASTER}):
            r = httpx.post(
                proxy.base_url + "/chat/completions",
                params=params,
                json={"model": "advisor", "messages": MSGS},
            )
            assert r.status_code == 401 and "URL" in r.json()["error"]["message"]


def test_virtual_keys_over_the_admin_api(cfg):
    with proxy_for(cfg) as proxy:
        alice = make_key(proxy, "alice", models=["advisor"], rpm=100)
        assert alice.startswith("sk-adv-") and len(alice) >= 7 + 43
        assert chat(proxy, alice).choices[0].message.content == "ok"
        # a virtual key is not the master key
        assert admin(proxy, "GET", "/admin/keys", key=alice).status_code == 403
        assert (
            httpx.get(proxy.root_url + "/", headers={"Authorization": f"Bearer {alice}"}).status_code == 403
        )
        listed = admin(proxy, "GET", "/admin/keys")
        assert alice not in listed.text and "key_hash" not in listed.text
        (row,) = listed.json()["data"]
        assert row["name"] == "alice" and row["spent_usd"] > 0 and row["last_used_at"] is not None
        # a model outside its globs: 403 in the wire's shape
        with pytest.raises(anthropic.PermissionDeniedError) as e:
            message(proxy, alice, model="claude-x")
        assert "may not use model 'claude-x'" in e.value.message
        assert (
            admin(proxy, "PATCH", "/admin/keys/alice", json={"models": "advisor,claude-*"}).status_code == 200
        )
        assert message(proxy, alice).content[0].text == "ok"
        # revoked: refused at once on this replica
        assert admin(proxy, "DELETE", "/admin/keys/alice").json()["state"] == "revoked"
        with pytest.raises(openai.AuthenticationError) as e:
            chat(proxy, alice)
        assert "revoked" in e.value.message
        # expired
        bob = make_key(proxy, "bob", expires="0s")
        with pytest.raises(anthropic.AuthenticationError) as e:
            message(proxy, bob)
        assert "expired" in e.value.message
        assert admin(proxy, "PATCH", "/admin/keys/bob", json={"expires": "30d"}).status_code == 200
        assert chat(proxy, bob).choices[0].message.content == "ok"
        # bad admin input: one line, no key made
        bad = admin(proxy, "POST", "/admin/keys", json={"name": "carol", "period": "week"})
        assert bad.status_code == 400 and "period" in bad.json()["error"]["message"]
        assert admin(proxy, "POST", "/admin/keys", json={"name": "bob"}).status_code == 400
        assert admin(proxy, "DELETE", "/admin/keys/nobody").status_code == 404


def test_a_budget_is_checked_before_and_booked_after_each_call(cfg):
    # each call: 1000 input and 100 output tokens at the executor's price
    per_call = (1000 * EXEC_PRICE.input + 100 * EXEC_PRICE.output) / 1e6
    with proxy_for(cfg) as proxy:
        key = make_key(proxy, "dave", max_usd=per_call * 2.5, period="day")
        for _ in range(3):  # 0, 1, 2 calls spent: under the budget each time
            chat(proxy, key)
        with pytest.raises(openai.APIStatusError) as e:
            chat(proxy, key)
        assert e.value.status_code == 402
        text = e.value.message
        assert "budget" in text and f"${per_call * 3:.6f}" in text and "today" in text
        with pytest.raises(anthropic.APIStatusError) as e:
            message(proxy, key)
        assert e.value.status_code == 402 and e.value.body["error"]["type"] == "budget_exceeded"
        # a raise lets it go on
        assert admin(proxy, "PATCH", "/admin/keys/dave", json={"max_usd": 1.0}).status_code == 200
        assert chat(proxy, key).choices[0].message.content == "ok"
        spend = admin(proxy, "GET", "/admin/spend").json()
        (row,) = [r for r in spend["by_key"] if r["key_name"] == "dave"]
        assert row["calls"] == 4 and row["usd"] == pytest.approx(per_call * 4) and row["in_flight"] == 0


def test_a_key_over_its_rate_limit_gets_a_429_with_retry_after(cfg):
    with proxy_for(cfg) as proxy:
        key = make_key(proxy, "erin", rpm=2)
        chat(proxy, key)
        chat(proxy, key)
        with pytest.raises(openai.RateLimitError) as e:
            chat(proxy, key)
        assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
        assert "2 requests per minute" in e.value.message
        with pytest.raises(anthropic.RateLimitError):
            message(proxy, key)
        chat(proxy, MASTER)  # the master key has no rate limit


def test_request_bodies_over_the_limit_get_a_413_before_being_read_whole(upstream, tmp_path, monkeypatch):
    monkeypatch.setenv(MASTER_ENV, MASTER)
    cfg = make_config(upstream, tmp_path, auth={"master_key_env": MASTER_ENV}, max_request_bytes=4096)
    big = [{"role": "user", "content": "x" * 10_000}]
    with proxy_for(cfg) as proxy:
        with pytest.raises(openai.APIStatusError) as e:
            oa(proxy, MASTER).chat.completions.create(model="advisor", messages=big)
        assert e.value.status_code == 413 and "max_request_bytes" in e.value.message
        with pytest.raises(anthropic.APIStatusError) as e:
            an(proxy, MASTER).messages.create(model="claude-x", max_tokens=5, messages=big)
        assert e.value.status_code == 413
        # chunked, with no length: refused once the limit is passed
        sent = []

        def body():
            for _ in range(100):
                sent.append(1)
                yield b"x" * 1024

        r = httpx.post(
            proxy.base_url + "/chat/completions",
            content=body(),
            headers={"Authorization": f"Bearer {MASTER}"},
        )
        assert r.status_code == 413
        r = httpx.post(
            proxy.root_url + "/v1/messages/count_tokens",
            content=body(),
            headers={"x-api-key": MASTER},
        )
        assert r.status_code == 413 and r.json()["type"] == "error"
        # a stranger's big body is refused for its missing key, before the size is considered
        r = httpx.post(proxy.base_url + "/chat/completions", content=b"x" * 10_000)
        assert r.status_code == 401


def test_comparisons_are_of_fixed_length_digests(cfg, monkeypatch):
    """Constant time: what is compared is a digest of the presented key, 32 bytes or 64 hex characters
    whatever was sent, with hmac.compare_digest; so how much of a wrong key matched cannot show in the
    time (the raw key is never compared byte by byte)."""
    seen = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((len(a), len(b)))
        return real(a, b)

    with proxy_for(cfg) as proxy:
        key = make_key(proxy, "frank")
        monkeypatch.setattr(hmac, "compare_digest", spy)
        for given in (key, key[:-1] + ("A" if key[-1] != "A" else "B"), "x", "y" * 500):
            try:
                chat(proxy, given)
            except openai.AuthenticationError:
                pass
    assert seen and all(n in ((32, 32), (64, 64)) for n in seen)


def test_the_cli_makes_lists_and_revokes_keys_and_no_key_lands_in_a_file(cfg, tmp_path, upstream, capsys):
    from advisor.cli import main

    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    env = {**os.environ, "ADVISOR_CONFIG_DIR": str(tmp_path / "no-config")}

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(["proxy", "keys", *args, "--config", str(config)])
        out = capsys.readouterr()
        return code, out.out, out.err

    # the real command once, as a user runs it: the key alone on the last line of its output
    made = subprocess.run(
        [sys.executable, "-m", "advisor.cli", "proxy", "keys", "create", "--config", str(config), "--name", "gina",
         "--max-usd", "5", "--period", "month", "--rpm", "60", "--models", "claude-*,advisor", "--expires", "30d"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-adv-") and made.stdout.strip() == key
    with proxy_for(cfg) as proxy:
        assert chat(proxy, key).choices[0].message.content == "ok"  # made by the CLI, seen at once
        assert message(proxy, key).content[0].text == "ok"
        code, out, err = cli("list")
        assert code == 0 and "gina" in out and "$5/month" in out and key not in out + err
        code, out, _ = cli("list", "--json")
        rows = json.loads(out)
        assert rows[0]["spent_usd"] > 0 and rows[0]["models"] == ["claude-*", "advisor"]
        assert cli("update", "gina", "--rpm", "1000")[0] == 0
        assert cli("revoke", "gina")[0] == 0
        deadline = time.monotonic() + 30  # the replica re-reads the keys every refresh_s (0.2 s here)
        while True:
            try:
                chat(proxy, key)
            except openai.AuthenticationError as e:
                assert "revoked" in e.message
                break
            assert time.monotonic() < deadline, "the revocation never reached the proxy"
            time.sleep(0.05)
        for bad in (
            ("revoke", "nobody"),
            ("create", "--name", "bad name"),
            ("create", "--name", "x", "--expires", "soon"),
        ):
            code, _, err = cli(*bad)
            assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert main(["proxy", "report", "--config", str(config)]) == 0
    md = (cfg.sessions_dir / "report.md").read_text()
    assert "## Spend per key" in md and "| gina |" in md and "## Spend per model" in md
    # no key in any file the proxy or the CLI wrote: journal, database (and its WAL), reports
    files = [p for p in cfg.sessions_dir.rglob("*") if p.is_file()]
    assert any(p.name == "proxy.db" for p in files) and any(p.name == "journal.jsonl" for p in files)
    for p in files:
        data = p.read_bytes()
        assert key.encode() not in data and MASTER.encode() not in data, p


def test_a_non_loopback_host_without_auth_refuses_to_start(upstream, tmp_path):
    cfg = make_config(upstream, tmp_path)
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    env = {**os.environ, "ADVISOR_CONFIG_DIR": str(tmp_path / "no-config")}
    p = subprocess.run(
        [sys.executable, "-m", "advisor.cli", "proxy", "--config", str(config), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert "refusing to listen on 0.0.0.0" in line and "auth:" in line and "--allow-unauthenticated" in line


def test_a_streamed_request_with_a_virtual_key_is_metered_and_refused_over_budget(cfg):
    per_call = (1000 * EXEC_PRICE.input + 100 * EXEC_PRICE.output) / 1e6
    with proxy_for(cfg) as proxy:
        key = make_key(proxy, "hana", max_usd=per_call * 1.5)
        client = oa(proxy, key)
        for _ in range(2):  # the second starts under the budget (one call spent)
            chunks = list(
                client.chat.completions.create(
                    model="advisor", messages=MSGS, stream=True, stream_options={"include_usage": True}
                )
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ok"
        with pytest.raises(anthropic.APIStatusError) as e:
            with an(proxy, key).messages.stream(model="claude-x", max_tokens=50, messages=MSGS) as s:
                s.get_final_message()
        assert e.value.status_code == 402 and "budget" in e.value.message
        (row,) = [r for r in admin(proxy, "GET", "/admin/spend").json()["by_key"] if r["key_name"] == "hana"]
        assert row["calls"] == 2 and row["usd"] == pytest.approx(per_call * 2)
