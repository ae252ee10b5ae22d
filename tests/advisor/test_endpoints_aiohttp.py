"""The HTTP endpoints give the same results on every client (httpx, aiohttp, httptools) against a real server."""

from __future__ import annotations

import socket

import httpx
import pytest

from advisor.endpoints import make_endpoint
from advisor.endpoints.base import EndpointConfig, EndpointError
from advisor.endpoints.http import preferred_client
from advisor.endpoints.stream import StreamEnd
from advisor.messages import Message
from advisor.testing import Delay, HTTPError, Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage

pytest.importorskip("aiohttp")
CLIENTS = ["httpx", "aiohttp", "httptools"]


async def _no_sleep(_s: float) -> None:
    return None


def _endpoint(server: ScriptedServer, model: str, client: str, provider: str = "openai", **options):
    fields = {k: options.pop(k) for k in ("timeout_s", "max_retries", "api_key_env") if k in options}
    cfg = server.endpoint_config(model, provider, **fields)
    return make_endpoint(model, cfg, http_client=client, backoff_s=0.0, sleep=_no_sleep, **options)


def _reply() -> Reply:
    return Reply(
        text="looking",
        tool_calls=[ScriptedToolCall("bash", {"cmd": "ls"}, id="c1")],
        reasoning="first the files",
        usage=ScriptedUsage(prompt_tokens=120, completion_tokens=30, cached_tokens=100, reasoning_tokens=12),
    )


def _summary(resp) -> tuple:
    m = resp.message
    calls = [(c.id, c.name, c.arguments) for c in m.tool_calls]
    return m.text, m.reasoning, calls, resp.usage, resp.finish_reason, resp.model


@pytest.mark.parametrize("provider, stream", [("openai", False), ("openai", True), ("anthropic", False)])
async def test_a_reply_is_the_same_on_every_client(provider, stream):
    results = {}
    with ScriptedServer({"m": lambda body: _reply()}) as server:
        for client in CLIENTS:
            options = {"stream": stream} if provider == "openai" else {}
            ep = _endpoint(server, "m", client, provider, **options)
            try:
                results[client] = _summary(await ep.complete([Message.user("list the files")]))
            finally:
                await ep.aclose()
        bodies = [r.body for r in server.requests]
    assert results["httpx"] == results["aiohttp"] == results["httptools"]
    assert results["aiohttp"][0] == "looking" and results["aiohttp"][2] == [("c1", "bash", {"cmd": "ls"})]
    assert bodies[0] == bodies[1] == bodies[2]  # the same request went out


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_stream_is_the_same_on_every_client(provider):
    deltas = {}
    with ScriptedServer({"m": lambda body: _reply()}) as server:
        for client in CLIENTS:
            ep = _endpoint(server, "m", client, provider)
            try:
                deltas[client] = [
                    _summary(d.response) if isinstance(d, StreamEnd) else d
                    async for d in ep.stream([Message.user("list the files")])
                ]
            finally:
                await ep.aclose()
    assert deltas["httpx"] == deltas["aiohttp"] == deltas["httptools"]
    assert len(deltas["httptools"]) >= 3  # reasoning, text, the tool call, then the end


@pytest.mark.parametrize("client", CLIENTS)
async def test_rate_limits_are_retried_after_the_servers_wait_and_errors_read(client):
    turns = [HTTPError(429, "slow down", retry_after=0.01), "fine", HTTPError(400, "bad field")]
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)

    with ScriptedServer({"m": turns}) as server:
        cfg = server.endpoint_config("m", max_retries=2)
        ep = make_endpoint("m", cfg, http_client=client, sleep=sleep)
        attempts = []
        resp = await ep.complete([Message.user("x")], on_attempt=attempts.append)
        with pytest.raises(EndpointError) as err:
            await ep.complete([Message.user("x")])
        await ep.aclose()
    assert resp.message.text == "fine" and waits == [0.01]
    assert [(a.ok, a.status, a.retry_after_s) for a in attempts] == [(False, 429, 0.01), (True, 200, None)]
    assert "slow down" in attempts[0].error
    assert err.value.status == 400 and "HTTP 400" in str(err.value) and "bad field" in str(err.value)


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_hanging_server_times_out(client):
    with ScriptedServer({"m": [Delay(5.0)]}) as server:
        ep = _endpoint(server, "m", client, timeout_s=0.3, max_retries=0)
        with pytest.raises(EndpointError, match=r"timeout after 0.3s"):
            await ep.complete([Message.user("x")])
        await ep.aclose()


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_refused_connection_is_a_retried_connection_error(client):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    cfg = EndpointConfig(
        provider="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1", free=True, max_retries=1
    )
    ep = make_endpoint("m", cfg, http_client=client, backoff_s=0.0, sleep=_no_sleep)
    with pytest.raises(EndpointError) as err:
        await ep.complete([Message.user("x")])
    await ep.aclose()
    assert "connection error" in str(err.value) and "(after 2 attempts)" in str(err.value)


@pytest.mark.parametrize("client", ["aiohttp", "httptools"])
async def test_the_api_key_goes_in_the_header(client, monkeypatch):
    monkeypatch.setenv("SCRIPTED_KEY", "sk-test-123")
    with ScriptedServer({"m": ["ok", HTTPError(401, "no such key")]}) as server:
        ep = _endpoint(server, "m", client, api_key_env="SCRIPTED_KEY")
        await ep.complete([Message.user("x")])
        with pytest.raises(EndpointError) as err:
            await ep.complete([Message.user("x")])
        await ep.aclose()
        assert server.requests[0].auth_is("sk-test-123")
    assert "HTTP 401" in str(err.value) and "sk-test-123" not in str(err.value)


def test_bad_client_choices_are_one_line_errors():
    cfg = EndpointConfig(provider="openai", model="m", base_url="http://127.0.0.1:9/v1", free=True)
    with pytest.raises(EndpointError, match="http_client must be httpx, aiohttp or httptools"):
        make_endpoint("m", cfg, http_client="requests")
    with pytest.raises(EndpointError, match="cannot be used with http_client aiohttp"):
        make_endpoint("m", cfg, http_client="aiohttp", transport=httpx.MockTransport(lambda r: None))
    tls = cfg.model_copy(update={"base_url": "https://api.example.com/v1"})
    with pytest.raises(EndpointError, match="httptools takes http:// base URLs only"):
        make_endpoint("m", tls, http_client="httptools")


def test_the_preferred_client_is_httptools_where_it_can_reach(monkeypatch):
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert preferred_client("http://127.0.0.1:8000/v1") == "httptools"
    assert preferred_client("https://api.openai.com/v1") == "aiohttp"  # TLS
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    assert preferred_client("http://10.0.0.5:8000/v1") == "aiohttp"  # through the proxy
    monkeypatch.setenv("NO_PROXY", "10.0.0.5")
    assert preferred_client("http://10.0.0.5:8000/v1") == "httptools"


@pytest.mark.parametrize("client", ["httpx", "aiohttp"])
async def test_a_proxy_from_the_environment_is_used(client, monkeypatch):
    with ScriptedServer({"m": ["via the proxy"]}) as server:
        monkeypatch.setenv("HTTP_PROXY", server.root_url)  # the scripted server answers as the proxy
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        cfg = EndpointConfig(
            provider="openai", model="m", base_url="http://upstream.invalid/v1", free=True, max_retries=0
        )
        ep = make_endpoint("m", cfg, http_client=client)
        resp = await ep.complete([Message.user("x")])
        await ep.aclose()
    assert resp.message.text == "via the proxy"
