"""Retries, attempts and final errors, identical for both HTTP providers (respx)."""

import asyncio
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
import respx

from advisor.endpoints import EndpointConfig, EndpointError, make_endpoint
from advisor.endpoints.retry import parse_retry_after
from advisor.messages import Message

OPENAI_URL = "http://llm.test/v1/chat/completions"
ANTHROPIC_URL = "http://claude.test/v1/messages"


class Sleeps:
    """A stand-in for asyncio.sleep that records what the retry policy asked for."""

    def __init__(self):
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def ok_body(provider: str) -> dict:
    if provider == "openai":
        return {
            "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "done"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2},
        }
    return {
        "type": "message",
        "model": "m",
        "content": [{"type": "text", "text": "done"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 10, "output_tokens": 2},
    }


def error_body(provider: str, message: str) -> dict:
    if provider == "openai":
        return {"error": {"message": message, "type": "invalid_request_error"}}
    return {"type": "error", "error": {"type": "invalid_request_error", "message": message}}


def setup(provider: str, **options):
    url = OPENAI_URL if provider == "openai" else ANTHROPIC_URL
    base = "http://llm.test/v1" if provider == "openai" else "http://claude.test"
    sleeps = Sleeps()
    config = EndpointConfig(
        provider=provider, model="m", base_url=base, max_retries=options.pop("max_retries", 4)
    )
    ep = make_endpoint("ep", config, sleep=sleeps, backoff_s=options.pop("backoff_s", 0.25), **options)
    return ep, respx.post(url), sleeps


providers = pytest.mark.parametrize("provider", ["openai", "anthropic"])


@providers
@respx.mock
async def test_429_with_retry_after_then_success(provider):
    ep, route, sleeps = setup(provider)
    route.mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "7"}, json=error_body(provider, "rate limited")),
            httpx.Response(200, json=ok_body(provider)),
        ]
    )
    seen = []
    r = await ep.complete([Message.user("q")], on_attempt=seen.append)
    assert r.message.text == "done"
    assert sleeps.calls == [7.0]  # the server's wait, not the backoff
    assert seen == r.attempts and [a.number for a in r.attempts] == [1, 2]
    first, second = r.attempts
    assert (first.ok, first.status, first.retry_after_s, first.usage) == (False, 429, 7.0, None)
    assert "HTTP 429" in first.error and "rate limited" in first.error
    assert second.ok and second.status == 200 and second.usage == r.usage
    assert r.latency_s >= first.latency_s + second.latency_s


@respx.mock
async def test_retry_after_is_really_waited_with_the_default_sleep():
    config = EndpointConfig(provider="openai", model="m", base_url="http://llm.test/v1")
    ep = make_endpoint("ep", config)
    respx.post(OPENAI_URL).mock(
        side_effect=[
            httpx.Response(429, headers={"retry-after-ms": "150"}),
            httpx.Response(200, json=ok_body("openai")),
        ]
    )
    t0 = time.perf_counter()
    r = await ep.complete([Message.user("q")])
    assert time.perf_counter() - t0 >= 0.15
    assert r.attempts[0].retry_after_s == pytest.approx(0.15)


@providers
@respx.mock
async def test_5xx_then_success_uses_backoff(provider):
    ep, route, sleeps = setup(provider, backoff_s=0.25)
    route.mock(
        side_effect=[
            httpx.Response(500, json=error_body(provider, "internal")),
            httpx.Response(503, text="unavailable"),
            httpx.Response(200, json=ok_body(provider)),
        ]
    )
    r = await ep.complete([Message.user("q")])
    assert [a.status for a in r.attempts] == [500, 503, 200]
    assert "internal" in r.attempts[0].error and "unavailable" in r.attempts[1].error
    assert 0.25 <= sleeps.calls[0] <= 0.5 and 0.5 <= sleeps.calls[1] <= 0.75  # doubling, plus jitter


@providers
@respx.mock
async def test_400_is_not_retried(provider):
    ep, route, sleeps = setup(provider)
    route.mock(return_value=httpx.Response(400, json=error_body(provider, "messages: field required")))
    seen = []
    with pytest.raises(EndpointError) as exc:
        await ep.complete([Message.user("q")], on_attempt=seen.append)
    err = exc.value
    assert route.call_count == 1 and sleeps.calls == []
    assert err.status == 400 and len(err.attempts) == 1 and seen == err.attempts
    assert str(err) == "endpoint 'ep': HTTP 400: invalid_request_error: messages: field required"


@providers
@respx.mock
async def test_timeout_and_connection_errors_are_retried(provider):
    ep, route, sleeps = setup(provider)
    route.mock(
        side_effect=[
            httpx.ReadTimeout("read timed out"),
            httpx.ConnectError("refused"),
            httpx.Response(200, json=ok_body(provider)),
        ]
    )
    r = await ep.complete([Message.user("q")])
    a1, a2, a3 = r.attempts
    assert not a1.ok and a1.status is None and a1.error.startswith("timeout after 120s")
    assert not a2.ok and a2.error == "connection error: ConnectError: refused"
    assert a3.ok and len(sleeps.calls) == 2


@providers
@respx.mock
async def test_gives_up_after_max_retries_with_every_attempt(provider):
    ep, route, sleeps = setup(provider, max_retries=2)
    route.mock(
        return_value=httpx.Response(
            529 if provider == "anthropic" else 502, json=error_body(provider, "overloaded")
        )
    )
    with pytest.raises(EndpointError) as exc:
        await ep.complete([Message.user("q")])
    assert route.call_count == 3 and len(exc.value.attempts) == 3 and len(sleeps.calls) == 2
    assert str(exc.value).endswith("overloaded (after 3 attempts)")
    assert exc.value.status in (502, 529)


@respx.mock
async def test_retry_after_beyond_the_limit_fails_at_once():
    ep, route, sleeps = setup("openai", max_retry_after_s=60)
    route.mock(
        return_value=httpx.Response(429, headers={"Retry-After": "3600"}, json=error_body("openai", "quota"))
    )
    with pytest.raises(EndpointError, match=r"Retry-After 3600s exceeds the 60s limit"):
        await ep.complete([Message.user("q")])
    assert route.call_count == 1 and sleeps.calls == []


def test_parse_retry_after_forms():
    now = time.time()
    later = format_datetime(datetime.fromtimestamp(now, UTC) + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after({"retry-after": "2.5"}) == 2.5
    assert parse_retry_after({"retry-after": later}, now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


async def test_forty_concurrent_calls_share_one_client():
    calls = 0

    def handler(request):
        nonlocal calls
        calls += 1
        return httpx.Response(200, json=ok_body("openai"))

    config = EndpointConfig(provider="openai", model="m", base_url="http://llm.test/v1")
    ep = make_endpoint("ep", config, transport=httpx.MockTransport(handler))
    results = await asyncio.gather(*(ep.complete([Message.user(str(i))]) for i in range(40)))
    client = ep.client()
    await ep.aclose()
    assert calls == 40 and all(r.message.text == "done" for r in results)
    assert client.is_closed


@providers
async def test_a_dead_url_says_each_retry_on_a_line_of_its_own(provider, caplog):
    import logging
    import socket

    with socket.socket() as s:  # a port nobody listens on: every connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}" + ("/v1" if provider == "openai" else "")
    sleeps = Sleeps()
    config = EndpointConfig(provider=provider, model="m", base_url=base, max_retries=2, api_key_env=None)
    ep = make_endpoint("ep", config, sleep=sleeps, backoff_s=0.25)
    with caplog.at_level(logging.WARNING, logger="advisor.endpoints"), pytest.raises(EndpointError) as err:
        await ep.complete([Message.user("q")])
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("advisor.endpoints")]
    assert len(lines) == len(sleeps.calls) == 2
    for n, (line, wait) in enumerate(zip(lines, sleeps.calls, strict=True), start=1):
        assert line.startswith("endpoint ep: ") and f"retry {n} of 2 in {wait:.1f} s" in line
        assert "connect" in line.lower()  # what is wrong, not only that something is
    assert "after 3 attempts" in str(err.value)
