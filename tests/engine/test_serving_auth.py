"""`advisor serve --api-key`: every route but /health needs the key (the official `openai` SDK as the
client, the real server on 127.0.0.1); a non-loopback --host without a key refuses to start."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from advisor.engine.serving.auth import is_loopback, key_in_query, key_matches  # noqa: E402
from advisor.engine.serving.server import load_served, running  # noqa: E402

from tests.engine.serve_helpers import MESSAGES, tiny_checkpoint  # noqa: E402

KEY = "sk-serve-" + "k" * 40


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("serve_auth_ckpt"))
    served = load_served(str(ckpt), kv_blocks=64, max_model_len=512, name="tiny")
    with running(served, api_key=KEY) as url:
        yield url


def test_the_right_key_is_served_and_health_is_open(base):
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0)
    assert out.usage.completion_tokens > 0
    assert httpx.get(base + "/health").json()["status"] == "ok"  # load balancers probe without a key


@pytest.mark.parametrize("key", [None, "wrong", KEY[:-1], KEY + "x"])
def test_a_missing_or_wrong_key_is_a_401_in_the_openai_shape(base, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(
        base + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES}, headers=headers
    )
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    assert KEY not in r.text and (key is None or key not in r.text)
    client = openai.OpenAI(base_url=base + "/v1", api_key=key or "none", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_a_key_in_the_query_string_is_refused_even_when_right(base):
    r = httpx.get(base + "/v1/models", params={"api_key": KEY})
    assert r.status_code == 401 and "URL" in r.json()["error"]["message"]


def test_helpers():
    assert key_matches(KEY, KEY) and not key_matches(KEY[:-1], KEY) and not key_matches(None, KEY)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")
    assert key_in_query(b"a=1&api_key=x") and not key_in_query(b"a=1") and not key_in_query(b"")


def test_a_non_loopback_host_without_a_key_refuses_to_start(monkeypatch, capsys):
    env = {k: v for k, v in os.environ.items() if k != "ADVISOR_API_KEY"}
    p = subprocess.run(
        [sys.executable, "-m", "advisor.cli", "serve", "/nonexistent-model", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to listen on 0.0.0.0" in lines[0] and "--api-key" in lines[0]
    # with a key (the option or ADVISOR_API_KEY), or said on purpose, it goes on to load the model
    from advisor.engine.serving import args as serve_args
    from advisor.engine.serving import server

    def no_model(*a, **k):
        raise FileNotFoundError("no model here")

    monkeypatch.setattr(server, "load_served", no_model)
    monkeypatch.delenv("ADVISOR_API_KEY", raising=False)
    parser = argparse.ArgumentParser()
    serve_args.add_serve_arguments(parser)
    for extra, env_key in ((["--api-key", KEY], None), (["--allow-unauthenticated"], None), ([], KEY)):
        if env_key:
            monkeypatch.setenv("ADVISOR_API_KEY", env_key)
        assert server.serve(parser.parse_args(["m", "--host", "0.0.0.0", *extra])) == 2
        err = capsys.readouterr().err
        assert "refusing" not in err and "no model here" in err
