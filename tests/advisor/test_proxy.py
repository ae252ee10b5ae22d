"""The proxy end to end over real sockets: a harness's requests (httpx here; the SDKs in
test_proxy_clients.py) -> the proxy on uvicorn -> ScriptedServer upstreams."""

from __future__ import annotations

import json

import httpx
import pytest

from advisor.messages import Usage
from advisor.proxy.router import Router
from advisor.proxy.server import ProxyServer
from advisor.proxy.wire import OPENAI
from advisor.testing import Delay, HTTPError, Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage
from tests.advisor.proxy_helpers import EXEC_PRICE, FRONTIER_PRICE, fast_router, make_config, proxy_for

TOOLS_OPENAI = [
    {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "run a shell command",
            "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]},
        },
    }
]
TOOLS_ANTHROPIC = [
    {
        "name": "bash",
        "description": "run a shell command",
        "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]},
    }
]


def oa(messages, **extra):
    return {"model": "advisor", "messages": messages, "tools": TOOLS_OPENAI, **extra}


def call_msg(call_id, cmd):
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": "bash", "arguments": json.dumps({"cmd": cmd})},
            }
        ],
    }


def tool_msg(call_id, text):
    return {"role": "tool", "tool_call_id": call_id, "content": text}


@pytest.fixture
def upstream():
    with ScriptedServer() as server:
        yield server


def test_openai_request_goes_to_the_executor_with_headers_and_exact_ledger(upstream, tmp_path):
    usage = ScriptedUsage(prompt_tokens=1234, completion_tokens=56, cached_tokens=1000, reasoning_tokens=6)
    upstream.script(
        "flash", [Reply(tool_calls=[ScriptedToolCall("bash", {"cmd": "ls"}, id="c1")], usage=usage)]
    )
    cfg = make_config(upstream, tmp_path)
    with proxy_for(cfg) as proxy:
        r = httpx.post(
            f"{proxy.base_url}/chat/completions",
            json=oa([{"role": "system", "content": "you code"}, {"role": "user", "content": "list files"}]),
            headers={"x-advisor-session": "s1"},
        )
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["model"] == "advisor"
    assert data["choices"][0]["finish_reason"] == "tool_calls"
    call = data["choices"][0]["message"]["tool_calls"][0]
    assert call["id"] == "c1" and json.loads(call["function"]["arguments"]) == {"cmd": "ls"}
    assert data["usage"]["prompt_tokens"] == 1234 and data["usage"]["completion_tokens"] == 56
    assert data["usage"]["prompt_tokens_details"]["cached_tokens"] == 1000
    assert r.headers["x-advisor-role"] == "executor"
    assert r.headers["x-advisor-model"] == "flash"
    assert r.headers["x-advisor-session"] == "s1"
    expected = EXEC_PRICE.cost(Usage(input=234, cached_input=1000, output=50, reasoning=6))
    assert float(r.headers["x-advisor-cost-usd"]) == pytest.approx(expected, abs=1e-8)
    # what went upstream: the harness's messages and tools, the executor's effort
    sent = upstream.requests_for("flash")[0].body
    assert sent["messages"][1] == {"role": "user", "content": "list files"}
    assert sent["tools"][0]["function"]["name"] == "bash"
    assert sent["reasoning_effort"] == "low"
    session = proxy.router.store.sessions["s1"]
    assert session.ledger.tokens("executor") == Usage(input=234, cached_input=1000, output=50, reasoning=6)


def test_anthropic_client_on_an_openai_upstream_translates_tools_usage_and_stop(upstream, tmp_path):
    upstream.script(
        "flash",
        [
            Reply(
                text="running it",
                tool_calls=[ScriptedToolCall("bash", {"cmd": "pytest"}, id="t1")],
                usage=ScriptedUsage(300, 40, cached_tokens=100),
            ),
            Reply(text="all green", usage=ScriptedUsage(400, 10)),
        ],
    )
    cfg = make_config(upstream, tmp_path)
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 512,
        "system": [{"type": "text", "text": "you code"}],
        "tools": TOOLS_ANTHROPIC,
        "messages": [{"role": "user", "content": "run the tests"}],
    }
    with proxy_for(cfg) as proxy:
        r = httpx.post(f"{proxy.root_url}/v1/messages", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["type"] == "message" and data["model"] == "claude-sonnet-4-5"
        assert data["stop_reason"] == "tool_use"
        assert data["content"][0] == {"type": "text", "text": "running it"}
        assert data["content"][1] == {
            "type": "tool_use",
            "id": "t1",
            "name": "bash",
            "input": {"cmd": "pytest"},
        }
        assert data["usage"] == {
            "input_tokens": 200,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 0,
            "output_tokens": 40,
        }
        body["messages"] += [
            {"role": "assistant", "content": data["content"]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "3 passed"}],
            },
        ]
        r2 = httpx.post(f"{proxy.root_url}/v1/messages", json=body)
        assert r2.json()["stop_reason"] == "end_turn"
        assert r2.json()["content"] == [{"type": "text", "text": "all green"}]
    sent = upstream.requests_for("flash")[1].body
    assert sent["messages"][0] == {"role": "system", "content": "you code"}
    assert sent["messages"][2]["tool_calls"][0]["id"] == "t1"
    assert sent["messages"][3] == {"role": "tool", "tool_call_id": "t1", "content": "3 passed"}
    assert sent["max_tokens"] == 512


def test_openai_client_on_an_anthropic_upstream(upstream, tmp_path):
    upstream.script(
        "flash",
        [
            Reply(
                tool_calls=[ScriptedToolCall("bash", {"cmd": "ls"}, id="toolu_1")], usage=ScriptedUsage(50, 5)
            )
        ],
    )
    cfg = make_config(upstream, tmp_path, executor_provider="anthropic")
    with proxy_for(cfg) as proxy:
        r = httpx.post(
            f"{proxy.base_url}/chat/completions",
            json=oa([{"role": "system", "content": "sys"}, {"role": "user", "content": "go"}], max_tokens=99),
        )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "bash", "arguments": '{"cmd": "ls"}'}
    sent = upstream.requests_for("flash")[0]
    assert sent.path == "/v1/messages"
    assert sent.body["system"] == "sys" and sent.body["tools"][0]["input_schema"]["required"] == ["cmd"]
    assert sent.body["max_tokens"] == 99 + 1024  # low effort's thinking budget on top of the visible cap


def _sse_events(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            out.append(json.loads(line[5:]))
    return out


def test_streams_in_both_formats_carry_tool_calls_usage_and_stop(upstream, tmp_path):
    turn = Reply(
        text="ok", tool_calls=[ScriptedToolCall("bash", {"cmd": "make"}, id="x1")], usage=ScriptedUsage(70, 7)
    )
    upstream.script("flash", [turn, turn])
    cfg = make_config(upstream, tmp_path)
    with proxy_for(cfg) as proxy:
        r = httpx.post(
            f"{proxy.base_url}/chat/completions",
            json=oa(
                [{"role": "user", "content": "build"}], stream=True, stream_options={"include_usage": True}
            ),
        )
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-advisor-role"] == "executor"
        assert r.text.rstrip().endswith("data: [DONE]")
        chunks = _sse_events(r.text)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        args = "".join(
            tc["function"].get("arguments", "")
            for c in chunks
            if c["choices"]
            for tc in c["choices"][0]["delta"].get("tool_calls") or []
        )
        assert text == "ok" and json.loads(args) == {"cmd": "make"}
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
        assert chunks[-1]["usage"]["prompt_tokens"] == 70
        body = {
            "model": "advisor",
            "max_tokens": 100,
            "stream": True,
            "messages": [{"role": "user", "content": "b"}],
        }
        r = httpx.post(f"{proxy.root_url}/v1/messages", json=body)
        events = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
        assert events[0] == "message_start" and events[-1] == "message_stop"
        data = _sse_events(r.text)
        delta = next(d for d in data if d["type"] == "message_delta")
        assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["output_tokens"] == 7
        partial = "".join(
            d["delta"].get("partial_json", "") for d in data if d["type"] == "content_block_delta"
        )
        assert json.loads(partial) == {"cmd": "make"}


def _failing_conversation(n_failures: int):
    """An OpenAI conversation whose last `n_failures` tool results failed (the harness ran them)."""
    msgs = [
        {"role": "system", "content": "you fix tests"},
        {"role": "user", "content": "make the tests pass"},
    ]
    for i in range(n_failures):
        msgs += [
            call_msg(f"c{i}", f"pytest -k t{i}"),
            tool_msg(f"c{i}", f"FAILED test_{i}.py::t - AssertionError\n1 failed"),
        ]
    return msgs


def test_a_failure_streak_consults_the_frontier_and_its_advice_reaches_the_executor(upstream, tmp_path):
    upstream.script("flash", lambda body: Reply(tool_calls=[ScriptedToolCall("bash", {"cmd": "pytest"})]))
    upstream.script("big", [Reply(text="look at conftest.py first", usage=ScriptedUsage(500, 50))])
    cfg = make_config(upstream, tmp_path, escalation={"after_failures": 2, "mode": "advise"})
    with proxy_for(cfg) as proxy:
        url = f"{proxy.base_url}/chat/completions"
        h = {"x-advisor-session": "fix"}
        r0 = httpx.post(url, json=oa(_failing_conversation(0)), headers=h)
        r1 = httpx.post(url, json=oa(_failing_conversation(1)), headers=h)
        assert "x-advisor-consult" not in r0.headers and "x-advisor-consult" not in r1.headers
        r2 = httpx.post(url, json=oa(_failing_conversation(2)), headers=h)
        assert r2.headers["x-advisor-consult"] == "failures=advice"
        assert r2.headers["x-advisor-role"] == "executor"
        r3 = httpx.post(
            url,
            json=oa(_failing_conversation(2) + [call_msg("c9", "cat conftest.py"), tool_msg("c9", "ok")]),
            headers=h,
        )
        assert "x-advisor-consult" not in r3.headers
    consult = upstream.requests_for("big")[0].body
    assert "failed 2 steps in a row" in json.dumps(consult["messages"])
    execs = upstream.requests_for("flash")
    assert "look at conftest.py first" in json.dumps(execs[2].body["messages"][-1])
    # the advice stays at its place in the conversation for later requests
    assert any("look at conftest.py first" in json.dumps(m) for m in execs[3].body["messages"])
    s = proxy.router.store.sessions["fix"]
    assert s.policy.consults == 1 and s.policy.consecutive == 0
    assert s.ledger.tokens("frontier") == Usage(input=500, output=50)
    assert s.ledger.cost("frontier") == pytest.approx(FRONTIER_PRICE.cost(Usage(input=500, output=50)))
    assert float(r3.headers["x-advisor-cost-usd"]) == pytest.approx(s.ledger.total_usd, abs=1e-8)


def test_takeover_mode_lets_the_frontier_answer_then_hands_back(upstream, tmp_path):
    upstream.script("flash", lambda body: "exec")
    upstream.script("big", lambda body: "frontier")
    cfg = make_config(
        upstream, tmp_path, escalation={"after_failures": 1, "mode": "takeover", "takeover_steps": 1}
    )
    with proxy_for(cfg) as proxy:
        url = f"{proxy.base_url}/chat/completions"
        roles = [
            httpx.post(url, json=oa(_failing_conversation(n)), headers={"x-advisor-session": "t"}).headers[
                "x-advisor-role"
            ]
            for n in (0, 1)
        ]
        conv = _failing_conversation(1) + [call_msg("ok", "ls"), tool_msg("ok", "a.py")]
        roles.append(
            httpx.post(url, json=oa(conv), headers={"x-advisor-session": "t"}).headers["x-advisor-role"]
        )
    assert roles == ["executor", "frontier", "executor"]
    assert "takes over" in json.dumps(upstream.requests_for("big")[0].body["messages"])
    assert "hands the task back" in json.dumps(upstream.requests_for("flash")[-1].body["messages"])


def test_plan_and_new_user_turn_are_inflection_points(upstream, tmp_path):
    upstream.script("flash", lambda body: "done")
    upstream.script("big", lambda body: "plan: do it")
    cfg = make_config(upstream, tmp_path, escalation={"at": ["plan", "new_user_turn"]})
    with proxy_for(cfg) as proxy:
        url = f"{proxy.base_url}/chat/completions"
        conv = [{"role": "user", "content": "task one"}]
        a = httpx.post(url, json=oa(conv)).headers.get("x-advisor-consult")
        conv += [{"role": "assistant", "content": "done"}, {"role": "user", "content": "now task two"}]
        b = httpx.post(url, json=oa(conv)).headers.get("x-advisor-consult")
        conv += [call_msg("z", "ls"), tool_msg("z", "fine")]
        c = httpx.post(url, json=oa(conv)).headers.get("x-advisor-consult")
    assert (a, b, c) == ("plan=advice", "new_user_turn=advice", None)
    assert "asked for something new" in json.dumps(upstream.requests_for("big")[1].body)


def test_repeated_calls_and_a_user_saying_wrong_count_as_failures(upstream, tmp_path):
    upstream.script("flash", lambda body: "x")
    upstream.script("big", lambda body: "advice")
    cfg = make_config(upstream, tmp_path, escalation={"after_failures": 2})
    with proxy_for(cfg) as proxy:
        url = f"{proxy.base_url}/chat/completions"
        conv = [{"role": "user", "content": "go"}, call_msg("a", "ls"), tool_msg("a", "x.py")]
        httpx.post(url, json=oa(conv))
        conv += [call_msg("b", "ls"), tool_msg("b", "x.py")]  # the same call again: no progress
        httpx.post(url, json=oa(conv))
        s = next(iter(proxy.router.store.sessions.values()))
        assert s.policy.consecutive == 1
        conv += [
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": "That's wrong, it doesn't work."},
        ]
        r = httpx.post(url, json=oa(conv))
    assert r.headers["x-advisor-consult"] == "failures=advice"
    reasons = [
        json.loads(line)["reason"]
        for line in (tmp_path / "sessions" / "journal.jsonl").read_text().splitlines()
        if '"step_failed"' in line
    ]
    assert reasons == ["repeated_call", "user_says_wrong"]


def test_anthropic_is_error_counts_and_session_id_falls_back_to_a_hash(upstream, tmp_path):
    upstream.script("flash", lambda body: Reply(tool_calls=[ScriptedToolCall("bash", {"cmd": "x"})]))
    cfg = make_config(upstream, tmp_path, escalation={"after_failures": 5})
    base = {"model": "advisor", "max_tokens": 64, "tools": TOOLS_ANTHROPIC, "system": "s"}
    msgs = [{"role": "user", "content": "hello"}]
    with proxy_for(cfg) as proxy:
        url = f"{proxy.root_url}/v1/messages"
        r1 = httpx.post(url, json={**base, "messages": msgs})
        content = r1.json()["content"]
        msgs += [
            {"role": "assistant", "content": content},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": content[0]["id"],
                        "content": "boom",
                        "is_error": True,
                    }
                ],
            },
        ]
        r2 = httpx.post(url, json={**base, "messages": msgs})
        other = httpx.post(url, json={**base, "messages": [{"role": "user", "content": "another task"}]})
    assert r1.headers["x-advisor-session"] == r2.headers["x-advisor-session"].strip()
    assert r1.headers["x-advisor-session"].startswith("h-")
    assert other.headers["x-advisor-session"] != r1.headers["x-advisor-session"]
    assert proxy.router.store.sessions[r1.headers["x-advisor-session"]].policy.consecutive == 1


def test_budgets_per_session_and_per_day_refuse_in_the_clients_format(upstream, tmp_path):
    upstream.script("flash", lambda body: Reply(text="x", usage=ScriptedUsage(1_000_000, 0)))  # $0.20 a call
    cfg = make_config(upstream, tmp_path, budget={"max_usd": 0.5, "max_usd_per_day": 0.9})
    with proxy_for(cfg) as proxy:
        url = f"{proxy.base_url}/chat/completions"
        statuses = [
            httpx.post(url, json=oa([{"role": "user", "content": "a"}]), headers={"x-advisor-session": "a"})
            for _ in range(4)
        ]
        assert [r.status_code for r in statuses] == [200, 200, 200, 402]  # 0.6 >= 0.5 after the third
        err = statuses[-1].json()["error"]
        assert err["type"] == "budget_exceeded" and "max_usd 0.5" in err["message"]
        assert float(statuses[-1].headers["x-advisor-cost-usd"]) == pytest.approx(0.6)
        ok = [
            httpx.post(url, json=oa([{"role": "user", "content": "b"}]), headers={"x-advisor-session": "b"})
            for _ in range(3)
        ]
        assert [r.status_code for r in ok] == [
            200,
            200,
            402,
        ]  # the day reached 1.0 >= 0.9: one call over at most
        r = httpx.post(
            f"{proxy.root_url}/v1/messages",
            json={"model": "advisor", "max_tokens": 5, "messages": [{"role": "user", "content": "c"}]},
        )
        assert r.status_code == 402
        assert r.json()["type"] == "error" and "daily budget" in r.json()["error"]["message"]
    assert len(upstream.requests_for("flash")) == 5


def test_state_survives_a_restart_and_old_sessions_expire(upstream, tmp_path):
    upstream.script("flash", lambda body: "x")
    cfg = make_config(upstream, tmp_path, escalation={"after_failures": 2})
    with proxy_for(cfg) as proxy:
        url = f"{proxy.base_url}/chat/completions"
        httpx.post(url, json=oa(_failing_conversation(0)), headers={"x-advisor-session": "keep"})
        httpx.post(url, json=oa(_failing_conversation(1)), headers={"x-advisor-session": "keep"})
        httpx.post(url, json=oa(_failing_conversation(0)), headers={"x-advisor-session": "old"})
        before = proxy.router.store.sessions["keep"].ledger.total_usd
    router = fast_router(cfg)
    keep = router.store.sessions["keep"]
    assert keep.requests == 2 and keep.policy.consecutive == 1 and keep.seen == 4
    assert keep.ledger.total_usd == pytest.approx(before) and len(keep.ledger.calls) == 2
    assert router.store.spent_today() == pytest.approx(3 * EXEC_PRICE.cost(Usage(input=100, output=20)))
    router.store.close()
    # the restarted proxy goes on where it stopped: one more failure makes the streak of two
    upstream.script("big", lambda body: "advice")
    with proxy_for(cfg) as proxy:
        r = httpx.post(
            f"{proxy.base_url}/chat/completions",
            json=oa(_failing_conversation(2)),
            headers={"x-advisor-session": "keep"},
        )
    assert r.headers["x-advisor-consult"] == "failures=advice"

    def sessions_at_load():
        store = fast_router(cfg).store
        store.close()
        return store

    # bounded: a one-session limit expires the least recently used; a tiny ttl expires all at load
    cfg.sessions.max_sessions = 1
    assert list(sessions_at_load().sessions) == ["keep"]
    cfg.sessions.ttl_s = 1e-6
    store = sessions_at_load()
    assert store.sessions == {}
    assert store.spent_today() > 0  # the day's spend outlives its sessions


def test_bad_input_answers_one_line_errors_in_the_clients_format(upstream, tmp_path):
    cfg = make_config(upstream, tmp_path)
    with proxy_for(cfg) as proxy:
        oa_url, an_url = f"{proxy.base_url}/chat/completions", f"{proxy.root_url}/v1/messages"
        r = httpx.post(oa_url, content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = httpx.post(oa_url, json={"model": "advisor"})
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
        r = httpx.post(oa_url, json={"model": "advisor", "messages": [{"role": "wizard", "content": "x"}]})
        assert "messages[0].role" in r.json()["error"]["message"]
        r = httpx.post(oa_url, json=oa([{"role": "user", "content": "x"}], model="gpt-9"))
        assert r.status_code == 404 and "unknown model 'gpt-9'" in r.json()["error"]["message"]
        r = httpx.post(an_url, content=b"[]")
        assert r.status_code == 400 and r.json()["type"] == "error"
        r = httpx.post(
            an_url,
            json={
                "model": "advisor",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}],
                    }
                ],
            },
        )
        assert r.status_code == 400 and "base64" in r.json()["error"]["message"]
        models = httpx.get(f"{proxy.base_url}/models").json()
        assert [m["id"] for m in models["data"]] == ["advisor"]
    assert upstream.requests == []


def test_chat_routes_take_bodies_in_pieces_refuse_other_methods_and_report_their_own_bugs(
    upstream, tmp_path, monkeypatch
):
    upstream.script("flash", lambda body: "fine")
    cfg = make_config(upstream, tmp_path)
    body = json.dumps(oa([{"role": "user", "content": "x" * 300_000}])).encode()

    def pieces():  # a chunked upload: the app reads it as several ASGI messages
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    with proxy_for(cfg) as proxy:
        url = f"{proxy.base_url}/chat/completions"
        r = httpx.post(url, content=pieces(), headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
        assert (
            httpx.get(url).status_code == 405
            and httpx.get(f"{proxy.root_url}/v1/messages").status_code == 405
        )

        def broken(*_a, **_k):
            raise RuntimeError("a bug in the reply")

        monkeypatch.setattr(type(OPENAI), "reply", broken)
        r = httpx.post(url, json=oa([{"role": "user", "content": "x"}]))
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
    assert r.json()["error"]["message"] == "advisor proxy: internal error: RuntimeError: a bug in the reply"


def test_upstream_429_and_5xx_are_retried_then_reported(upstream, tmp_path):
    upstream.script(
        "flash",
        [
            HTTPError(429, retry_after=0),
            HTTPError(503),
            "fine",
            HTTPError(500),
            HTTPError(500),
            HTTPError(500),
        ],
    )
    cfg = make_config(upstream, tmp_path)
    with proxy_for(cfg) as proxy:
        url = f"{proxy.base_url}/chat/completions"
        r = httpx.post(url, json=oa([{"role": "user", "content": "a"}]))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
        r = httpx.post(url, json=oa([{"role": "user", "content": "b"}]))
    assert r.status_code == 502
    assert "HTTP 500" in r.json()["error"]["message"] and "after 3 attempts" in r.json()["error"]["message"]


def test_an_upstream_that_hangs_times_out(upstream, tmp_path):
    upstream.script("flash", [Delay(30)])
    cfg = make_config(upstream, tmp_path, endpoint_fields={"timeout_s": 0.3, "max_retries": 0})
    with proxy_for(cfg) as proxy:
        r = httpx.post(
            f"{proxy.root_url}/v1/messages",
            json={"model": "advisor", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
            timeout=10,
        )
    assert r.status_code == 504
    assert (
        r.json()["error"]["type"] == "timeout_error" and "timeout after 0.3s" in r.json()["error"]["message"]
    )


def test_images_cross_formats_both_ways(upstream, tmp_path):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    upstream.script("flash", lambda body: "a red box")
    # OpenAI client -> Anthropic upstream
    cfg = make_config(upstream, tmp_path, executor_provider="anthropic")
    content = [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
    ]
    with proxy_for(cfg) as proxy:
        r = httpx.post(f"{proxy.base_url}/chat/completions", json=oa([{"role": "user", "content": content}]))
    assert r.json()["choices"][0]["message"]["content"] == "a red box"
    block = upstream.requests_for("flash")[0].body["messages"][0]["content"][1]
    assert block == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}
    # Anthropic client (an image inside a tool result) -> OpenAI upstream
    cfg = make_config(upstream, tmp_path / "b")
    msgs = [
        {"role": "user", "content": "look"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "s1", "name": "bash", "input": {"cmd": "shot"}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "s1",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": png},
                        }
                    ],
                }
            ],
        },
    ]
    with proxy_for(cfg) as proxy:
        r = httpx.post(
            f"{proxy.root_url}/v1/messages",
            json={"model": "advisor", "max_tokens": 50, "tools": TOOLS_ANTHROPIC, "messages": msgs},
        )
    assert r.status_code == 200, r.text
    sent = upstream.requests_for("flash")[1].body["messages"]
    assert sent[2]["role"] == "tool" and sent[3]["role"] == "user"  # OpenAI tool messages cannot hold images
    assert sent[3]["content"][1]["image_url"]["url"] == f"data:image/png;base64,{png}"


def test_the_example_proxy_yaml_loads():
    from pathlib import Path

    from advisor.proxy.config import load_proxy_config

    cfg = load_proxy_config(Path(__file__).parents[2] / "examples" / "proxy" / "proxy.yaml")
    assert cfg.executor.endpoint == "flash" and cfg.frontier.endpoint == "claude"


def test_each_session_keeps_to_one_of_the_upstream_pools(upstream, tmp_path):
    upstream.script("flash", lambda body: "ok")
    cfg = make_config(upstream, tmp_path, upstream_pools=3)
    router = Router(cfg)
    pool = router.executor.pool
    assert len(pool) == 3 and len({id(e) for e in pool}) == 3
    picks = {sid: router.executor.for_session(sid) for sid in (f"s{i}" for i in range(30))}
    assert len({id(e) for e in picks.values()}) == 3  # sessions spread over the pools
    assert all(router.executor.for_session(sid) is ep for sid, ep in picks.items())  # and stay
    with ProxyServer(router) as proxy:
        r = httpx.post(f"{proxy.base_url}/chat/completions", json=oa([{"role": "user", "content": "x"}]))
    assert r.status_code == 200


@pytest.mark.parametrize("client", ["auto", "aiohttp", "httpx"])
def test_upstream_calls_go_out_on_the_client_asked_for(upstream, tmp_path, client, monkeypatch):
    pytest.importorskip("aiohttp")
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    upstream.script("flash", lambda body: Reply(text="ok", usage=ScriptedUsage(321, 12)))
    cfg = make_config(upstream, tmp_path, upstream_client=client, upstream_stream=True)
    router = Router(cfg)
    assert {e.http_client for e in router.executor.pool + router.frontier.pool} == (
        {"httptools"} if client == "auto" else {client}  # auto: the upstreams are plain http://
    )
    assert all(e.streams for e in router.executor.pool)  # the OpenAI upstream streams, as asked
    with ProxyServer(router) as proxy:
        r = httpx.post(f"{proxy.base_url}/chat/completions", json=oa([{"role": "user", "content": "x"}]))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
    assert r.json()["usage"]["prompt_tokens"] == 321 and r.headers["x-advisor-role"] == "executor"
    assert upstream.requests_for("flash")[0].body["stream"] is True
