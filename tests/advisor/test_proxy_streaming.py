"""Streaming through the proxy, token by token: each upstream delta reaches the client before the
upstream has finished (the scripted upstream holds the rest of its reply until the test has seen the
first delta), for both SDKs as clients and both upstream kinds, tool calls included; a stream that
breaks after its first delta ends in an error event and is still booked; a client that leaves closes
the upstream stream."""

from __future__ import annotations

import json
import threading
import time

import anthropic
import httpx
import openai
import pytest

from advisor.messages import Usage
from advisor.testing import HTTPError, Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage
from tests.advisor.proxy_helpers import EXEC_PRICE, make_config, proxy_for

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS_OA = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}}]
TOOLS_AN = [{"name": "weather", "description": "weather", "input_schema": WEATHER}]
USAGE = ScriptedUsage(321, 45, cached_tokens=21)


@pytest.fixture
def upstream():
    with ScriptedServer() as server:
        yield server


def _config(upstream, tmp_path, kind: str):
    cfg = make_config(upstream, tmp_path, executor_provider=kind)
    cfg.executor.effort = None  # no Anthropic thinking: the scripted reply is what is streamed
    return cfg


def _held_reply(hold: threading.Event, **fields) -> Reply:
    call = ScriptedToolCall("weather", {"city": "Lisbon"}, id="toolu_w1")
    return Reply(
        text="Let me check the weather.",
        tool_calls=[call],
        usage=USAGE,
        hold=hold,
        chunk_delay_s=0.01,
        **fields,
    )


def _exact(usage: ScriptedUsage) -> Usage:
    return Usage(
        input=usage.prompt_tokens - usage.cached_tokens,
        cached_input=usage.cached_tokens,
        output=usage.completion_tokens,
    )


def _journal_calls(tmp_path) -> list[dict]:
    lines = (tmp_path / "sessions" / "journal.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("type") == "call"]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_openai_sdk_gets_each_delta_before_the_upstream_finishes(upstream, tmp_path, kind):
    hold = threading.Event()
    upstream.script("flash", [_held_reply(hold)])
    with proxy_for(_config(upstream, tmp_path, kind)) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="advisor",
            messages=[{"role": "user", "content": "weather in Lisbon?"}],
            tools=TOOLS_OA,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, calls, finish, usage = "", {}, None, None
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                if choice.delta.content and not hold.is_set():
                    (rec,) = upstream.requests_for("flash")
                    # the upstream is still holding its reply: this delta was passed on as it came
                    assert rec.stream_outcome is None and rec.deltas_sent == 1
                    hold.set()
                text += choice.delta.content or ""
                for d in choice.delta.tool_calls or []:
                    slot = calls.setdefault(d.index, {"id": d.id, "name": "", "args": ""})
                    slot["name"] += d.function.name or ""
                    slot["args"] += d.function.arguments or ""
                finish = choice.finish_reason or finish
        assert hold.is_set()
    assert text == "Let me check the weather."
    assert calls == {0: {"id": "toolu_w1", "name": "weather", "args": json.dumps({"city": "Lisbon"})}}
    assert finish == "tool_calls"
    assert (usage.prompt_tokens, usage.completion_tokens) == (USAGE.prompt_tokens, USAGE.completion_tokens)
    assert usage.prompt_tokens_details.cached_tokens == USAGE.cached_tokens
    (rec,) = upstream.requests_for("flash")
    assert rec.body["stream"] is True and rec.stream_outcome == "complete"
    if kind == "openai":
        assert rec.body["stream_options"] == {"include_usage": True}
    (session,) = proxy.router.store.sessions.values()
    assert session.ledger.tokens("executor") == _exact(USAGE)
    assert session.ledger.cost("executor") == pytest.approx(EXEC_PRICE.cost(_exact(USAGE)))


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_anthropic_sdk_gets_each_delta_before_the_upstream_finishes(upstream, tmp_path, kind):
    hold = threading.Event()
    upstream.script("flash", [_held_reply(hold)])
    with proxy_for(_config(upstream, tmp_path, kind)) as proxy:
        client = anthropic.Anthropic(base_url=proxy.root_url, api_key="unused", max_retries=0)
        seen: list[str] = []
        with client.messages.stream(
            model="claude-sonnet-4-5",
            max_tokens=256,
            messages=[{"role": "user", "content": "weather in Lisbon?"}],
            tools=TOOLS_AN,
        ) as stream:
            for event in stream:
                seen.append(event.type)
                if event.type == "content_block_delta" and not hold.is_set():
                    (rec,) = upstream.requests_for("flash")
                    assert rec.stream_outcome is None and rec.deltas_sent == 1
                    hold.set()
            final = stream.get_final_message()
        assert hold.is_set()
    assert seen[0] == "message_start" and "input_json" in seen
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "Let me check the weather."
    assert (final.content[1].id, final.content[1].name, final.content[1].input) == (
        "toolu_w1",
        "weather",
        {"city": "Lisbon"},
    )
    assert final.stop_reason == "tool_use"
    u = final.usage
    assert (u.input_tokens, u.cache_read_input_tokens, u.output_tokens) == (300, 21, 45)
    (rec,) = upstream.requests_for("flash")
    assert rec.stream_outcome == "complete"
    (session,) = proxy.router.store.sessions.values()
    assert session.ledger.tokens("executor") == _exact(USAGE)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_stream_that_breaks_after_its_first_delta_ends_in_an_error_and_is_booked(upstream, tmp_path, kind):
    upstream.script("flash", lambda body: Reply(text="abcdefgh", usage=USAGE, cut_after=1))
    with proxy_for(_config(upstream, tmp_path, kind)) as proxy:
        oa = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        text = ""
        with pytest.raises(openai.APIError, match="stream broke off after its first delta"):
            for chunk in oa.chat.completions.create(
                model="advisor", messages=[{"role": "user", "content": "a"}], stream=True
            ):
                text += "".join(c.delta.content or "" for c in chunk.choices)
        assert text == "abcd"  # what came before the break was passed on
        an = anthropic.Anthropic(base_url=proxy.root_url, api_key="unused", max_retries=0)
        with (
            pytest.raises(anthropic.APIStatusError, match="stream broke off after its first delta"),
            an.messages.stream(
                model="advisor", max_tokens=50, messages=[{"role": "user", "content": "b"}]
            ) as stream,
        ):
            for _ in stream:
                pass
    # no retry once a delta was out: one upstream request per client request
    assert [r.stream_outcome for r in upstream.requests_for("flash")] == ["cut", "cut"]
    calls = _journal_calls(tmp_path)
    assert len(calls) == 2
    for call in calls:
        assert "stream broke off" in call["error"] and call["streamed_chars"] == 4
        assert call["usage"]["output"] > 0 and call["cost_usd"] > 0  # what was streamed is billed
    (s1, s2) = proxy.router.store.sessions.values()
    assert s1.ledger.tokens("executor").output > 0 and s2.ledger.tokens("executor").output > 0


def test_failures_before_the_first_delta_are_retried_and_then_an_http_error(upstream, tmp_path):
    upstream.script(
        "flash",
        [HTTPError(503), Reply(text="fine", usage=USAGE), HTTPError(500), HTTPError(500), HTTPError(500)],
    )
    with proxy_for(_config(upstream, tmp_path, "anthropic")) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "a"}]
        chunks = list(client.chat.completions.create(model="advisor", messages=msgs, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fine"
        with pytest.raises(openai.InternalServerError) as err:  # the proxy's 502, before any byte
            list(client.chat.completions.create(model="advisor", messages=msgs, stream=True))
        assert err.value.status_code == 502 and "after 3 attempts" in str(err.value)
    assert len(upstream.requests_for("flash")) == 5


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_client_that_leaves_mid_stream_closes_the_upstream_stream(upstream, tmp_path, kind):
    never = threading.Event()
    upstream.script(
        "flash",
        [Reply(text="x" * 400, usage=USAGE, hold=never, hold_s=20), Reply(text="again", usage=USAGE)],
    )
    with proxy_for(_config(upstream, tmp_path, kind)) as proxy:
        url = f"{proxy.base_url}/chat/completions"
        body = {"model": "advisor", "messages": [{"role": "user", "content": "s"}], "stream": True}
        headers = {"x-advisor-session": "leaver"}
        with httpx.Client(timeout=10) as c, c.stream("POST", url, json=body, headers=headers) as r:
            for line in r.iter_lines():
                if '"content":"x' in line:
                    break  # the first delta arrived: leave
        deadline = time.monotonic() + 10
        (rec,) = upstream.requests_for("flash")
        while rec.stream_outcome is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rec.stream_outcome == "client left" and rec.deltas_sent == 1
        # the session is unlocked and its ledger has the call, with what was streamed
        r = httpx.post(url, json={**body, "stream": False}, headers=headers, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "again"
        s = proxy.router.store.sessions["leaver"]
        assert len(s.ledger.calls) == 2
        assert s.ledger.calls[0].usage.output > 0
    first = _journal_calls(tmp_path)[0]
    assert first["error"] == "cancelled" and first["streamed_chars"] == 200
