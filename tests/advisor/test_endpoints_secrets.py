"""API keys come from the environment and never leak into errors, attempts, reprs or logs."""

import logging
import sys
import traceback
import types

import httpx
import pytest
import respx

from advisor.endpoints import EndpointConfig, EndpointError, make_endpoint
from advisor.messages import Message
from advisor.testing import HTTPError, ScriptedServer

KEY = "sk-DISTINCTIVE-7f3a9c1e55"


def everything_said(err: EndpointError, ep) -> str:
    return "\n".join(
        [
            str(err),
            repr(err),
            repr(err.attempts),
            repr(ep),
            repr(ep.config),
            "".join(traceback.format_exception(err)),
        ]
    )


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@respx.mock
async def test_key_is_sent_but_never_echoed(provider, monkeypatch):
    monkeypatch.setenv("ADVISOR_TEST_KEY", KEY)
    base = "http://llm.test/v1" if provider == "openai" else "http://llm.test"
    url = "http://llm.test/v1/chat/completions" if provider == "openai" else "http://llm.test/v1/messages"
    route = respx.post(url).mock(
        side_effect=[
            httpx.ConnectError(f"proxy refused credentials {KEY}"),
            httpx.Response(
                401, json={"error": {"message": f"Incorrect API key provided: {KEY}", "type": "auth"}}
            ),
        ]
    )
    ep = make_endpoint(
        "ep",
        EndpointConfig(provider=provider, model="m", base_url=base, api_key_env="ADVISOR_TEST_KEY"),
        backoff_s=0.001,
    )
    with pytest.raises(EndpointError) as exc:
        await ep.complete([Message.user("q")])
    sent = route.calls[0].request.headers
    assert sent.get("authorization") == f"Bearer {KEY}" or sent.get("x-api-key") == KEY
    text = everything_said(exc.value, ep)
    assert KEY not in text
    assert "Incorrect API key provided: ***" in str(exc.value) and exc.value.status == 401
    assert "***" in exc.value.attempts[0].error


async def test_missing_key_variable_is_named_and_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("ADVISOR_NO_SUCH_KEY", raising=False)
    ep = make_endpoint(
        "frontier", EndpointConfig(provider="anthropic", model="m", api_key_env="ADVISOR_NO_SUCH_KEY")
    )
    with respx.mock(assert_all_called=False) as mock:
        route = mock.post("https://api.anthropic.com/v1/messages")
        with pytest.raises(
            EndpointError,
            match=r"^endpoint 'frontier': environment variable ADVISOR_NO_SUCH_KEY \(api_key_env\) is not set",
        ):
            await ep.complete([Message.user("q")])
    assert route.call_count == 0


async def test_no_key_in_logs_over_real_http(monkeypatch, caplog):
    monkeypatch.setenv("ADVISOR_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    async with ScriptedServer({"m": [HTTPError(503, "busy"), "fine"]}) as server:
        ep = make_endpoint(
            "ep",
            EndpointConfig(
                provider="openai", model="m", base_url=server.base_url, api_key_env="ADVISOR_TEST_KEY"
            ),
            backoff_s=0.001,
        )
        r = await ep.complete([Message.user("q")])
        await ep.aclose()
    assert r.message.text == "fine" and len(r.attempts) == 2
    assert all(req.auth_is(KEY) for req in server.requests)
    assert caplog.records and KEY not in caplog.text  # httpx/httpcore debug logging saw the requests


def test_make_endpoint_embedded_is_lazy_and_clear_when_absent(monkeypatch):
    config = EndpointConfig(provider="embedded", model="tiny")
    monkeypatch.setitem(sys.modules, "advisor.endpoints.embedded", None)  # as if not written yet
    with pytest.raises(EndpointError, match="provider 'embedded' is not available"):
        make_endpoint("local", config)

    class EmbeddedEndpoint:
        def __init__(self, name, config, **options):
            self.name, self.config, self.options = name, config, options

    fake = types.ModuleType("advisor.endpoints.embedded")
    fake.EmbeddedEndpoint = EmbeddedEndpoint
    monkeypatch.setitem(sys.modules, "advisor.endpoints.embedded", fake)
    ep = make_endpoint("local", config, device="cpu")
    assert isinstance(ep, EmbeddedEndpoint) and ep.name == "local" and ep.options == {"device": "cpu"}
