"""A client's sampling parameters reach the upstream in its wire shape, through the proxy (the scripted
upstream records what it was sent); `n` > 1 is refused in the client's format."""

from __future__ import annotations

import httpx
import pytest

from advisor.testing import ScriptedServer
from tests.advisor.proxy_helpers import make_config, proxy_for

TOOL_OA = {
    "type": "function",
    "function": {"name": "bash", "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}},
}
TOOL_AN = {"name": "bash", "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}}}
SAMPLING_OA = {
    "temperature": 0.3,
    "top_p": 0.9,
    "stop": ["\nEND", "###"],
    "seed": 7,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.25,
    "parallel_tool_calls": False,
}
SAMPLING_AN = {
    "temperature": 0.3,
    "top_p": 0.9,
    "top_k": 40,
    "stop_sequences": ["\nEND"],
    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
}


@pytest.fixture
def upstream():
    with ScriptedServer() as server:
        server.script("flash", lambda body: "ok")
        yield server


def _openai(proxy, **body):
    return httpx.post(
        f"{proxy.base_url}/chat/completions",
        json={
            "model": "advisor",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [TOOL_OA],
            **body,
        },
    )


def _anthropic(proxy, **body):
    return httpx.post(
        f"{proxy.root_url}/v1/messages",
        json={
            "model": "advisor",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [TOOL_AN],
            **body,
        },
    )


def _picked(body: dict, *fields: str) -> dict:
    return {f: body[f] for f in fields if f in body}


def test_openai_client_to_openai_and_anthropic_upstreams(upstream, tmp_path):
    with proxy_for(make_config(upstream, tmp_path)) as proxy:
        assert _openai(proxy, **SAMPLING_OA).status_code == 200
    sent = upstream.requests_for("flash")[0].body
    assert _picked(sent, *SAMPLING_OA) == SAMPLING_OA

    cfg = make_config(upstream, tmp_path / "a", executor_provider="anthropic")
    cfg.executor.effort = None  # no thinking: every Anthropic sampling field can go
    with proxy_for(cfg) as proxy:
        assert _openai(proxy, **{**SAMPLING_OA, "stop": "STOP"}).status_code == 200
    sent = upstream.requests_for("flash")[1].body
    assert _picked(sent, "temperature", "top_p", "stop_sequences", "tool_choice") == {
        "temperature": 0.3,
        "top_p": 0.9,
        "stop_sequences": ["STOP"],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    }
    assert not {"seed", "stop", "presence_penalty", "frequency_penalty", "parallel_tool_calls"} & set(sent)


def test_anthropic_client_to_anthropic_and_openai_upstreams(upstream, tmp_path):
    cfg = make_config(upstream, tmp_path, executor_provider="anthropic")
    cfg.executor.effort = None
    with proxy_for(cfg) as proxy:
        assert _anthropic(proxy, **SAMPLING_AN).status_code == 200
    sent = upstream.requests_for("flash")[0].body
    assert _picked(sent, *SAMPLING_AN) == SAMPLING_AN

    # the executor's effort turns thinking on: what Anthropic refuses with thinking stays out
    cfg = make_config(upstream, tmp_path / "t", executor_provider="anthropic")
    with proxy_for(cfg) as proxy:
        assert _anthropic(proxy, **{**SAMPLING_AN, "top_p": 0.97}).status_code == 200
    sent = upstream.requests_for("flash")[1].body
    assert sent["thinking"]["type"] == "enabled" and sent["top_p"] == 0.97
    assert not {"temperature", "top_k"} & set(sent)

    with proxy_for(make_config(upstream, tmp_path / "o")) as proxy:
        assert _anthropic(proxy, **SAMPLING_AN).status_code == 200
    sent = upstream.requests_for("flash")[2].body
    assert _picked(sent, "temperature", "top_p", "top_k", "stop", "parallel_tool_calls", "tool_choice") == {
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 40,
        "stop": ["\nEND"],
        "parallel_tool_calls": False,
        "tool_choice": "auto",
    }


def test_unset_fields_are_not_sent(upstream, tmp_path):
    with proxy_for(make_config(upstream, tmp_path)) as proxy:
        assert _openai(proxy).status_code == 200
    sent = upstream.requests_for("flash")[0].body
    assert not {"temperature", "top_p", "top_k", "stop", "seed", "parallel_tool_calls"} & set(sent)


def test_n_above_one_and_bad_values_are_refused_in_the_clients_format(upstream, tmp_path):
    with proxy_for(make_config(upstream, tmp_path)) as proxy:
        r = _openai(proxy, n=2)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and "n must be 1 (got 2)" in err["message"]
        assert _openai(proxy, n=1).status_code == 200
        r = _openai(proxy, temperature=3)
        assert (
            r.status_code == 400
            and "temperature: must be a number from 0 to 2" in r.json()["error"]["message"]
        )
        r = _openai(proxy, stop=[""])
        assert r.status_code == 400 and "stop:" in r.json()["error"]["message"]
        r = _anthropic(proxy, temperature=1.5)
        assert r.status_code == 400 and r.json()["type"] == "error"
        assert "temperature: must be a number from 0 to 1" in r.json()["error"]["message"]
        r = _anthropic(proxy, top_k=0)
        assert r.status_code == 400 and "top_k" in r.json()["error"]["message"]
    assert len(upstream.requests_for("flash")) == 1
