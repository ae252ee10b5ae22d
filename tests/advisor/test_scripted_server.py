"""The scripted test server speaks real HTTP in both wire formats and records what it received."""

import asyncio
import io
import json
import time

import httpx
import pytest
from advisor.tools.spec import tool
from PIL import Image
from skimage import data

from advisor.endpoints import EndpointConfig, make_endpoint
from advisor.messages import ImagePart, Message
from advisor.testing import Delay, HTTPError, Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage


def test_openai_route_serves_script_in_order_and_records_requests():
    usage = ScriptedUsage(prompt_tokens=120, completion_tokens=30, cached_tokens=100, reasoning_tokens=12)
    scripts = {
        "flash": [
            HTTPError(429, "slow down", retry_after=2),
            Reply(
                tool_calls=[ScriptedToolCall("crop", {"box": [1, 2, 3, 4]}, id="c1")],
                reasoning="think",
                usage=usage,
            ),
            Reply(tool_calls=[ScriptedToolCall("crop", '{"box": [1, 2')], usage=None),
            "the answer",
        ]
    }
    with ScriptedServer(scripts) as server:
        assert server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
        url = f"{server.base_url}/chat/completions"
        body = {"model": "flash", "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "low"}
        with httpx.Client() as client:
            r1 = client.post(url, json=body, headers={"Authorization": "Bearer sk-test-SECRET"})
            r2 = client.post(url, json=body)
            r3 = client.post(url, json=body)
            r4 = client.post(url, json=body)
            r5 = client.post(url, json=body)
            r6 = client.post(url, json={**body, "model": "nope"})
        assert server.remaining("flash") == 0

    assert r1.status_code == 429 and r1.headers["retry-after"] == "2"
    assert r1.json()["error"]["message"] == "slow down"

    m2 = r2.json()["choices"][0]
    assert m2["finish_reason"] == "tool_calls"
    assert m2["message"]["reasoning_content"] == "think"
    call = m2["message"]["tool_calls"][0]
    assert call["id"] == "c1" and call["function"]["name"] == "crop"
    assert json.loads(call["function"]["arguments"]) == {"box": [1, 2, 3, 4]}
    u = r2.json()["usage"]
    assert u["prompt_tokens"] == 120 and u["prompt_tokens_details"]["cached_tokens"] == 100
    assert u["completion_tokens"] == 30 and u["completion_tokens_details"]["reasoning_tokens"] == 12

    assert r3.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"box": [1, 2'
    assert "usage" not in r3.json()
    assert r4.json()["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "the answer"},
        "finish_reason": "stop",
    }
    assert r5.status_code == 400 and "exhausted" in r5.json()["error"]["message"]
    assert r6.status_code == 404

    reqs = server.requests
    assert len(reqs) == 6 and [r.model for r in reqs] == ["flash"] * 5 + ["nope"]
    assert reqs[0].body["reasoning_effort"] == "low"
    # the credential is never stored, only a hash a test can check against
    assert reqs[0].headers["authorization"] == "<redacted>"
    assert reqs[0].has_auth and reqs[0].auth_is("sk-test-SECRET") and not reqs[0].auth_is("other")
    assert not reqs[1].has_auth
    assert "sk-test-SECRET" not in repr(reqs)


def test_callable_turns_and_scripts_see_the_request():
    def frontier(req):
        last = req["messages"][-1]["content"]
        return Reply(text=f"advice for: {last}")

    with ScriptedServer({"frontier": frontier, "flash": [lambda req: HTTPError(500, "boom")]}) as server:
        with httpx.Client(base_url=server.base_url) as client:
            for q in ("a", "b"):
                r = client.post(
                    "/chat/completions",
                    json={"model": "frontier", "messages": [{"role": "user", "content": q}]},
                )
                assert r.json()["choices"][0]["message"]["content"] == f"advice for: {q}"
            r = client.post("/chat/completions", json={"model": "flash", "messages": []})
            assert r.status_code == 500 and r.json()["error"]["message"] == "boom"
            models = client.get("/models").json()["data"]
        assert server.remaining("frontier") == -1
    assert {m["id"] for m in models} == {"flash", "frontier"}


def test_anthropic_route_renders_blocks_usage_and_errors():
    usage = ScriptedUsage(prompt_tokens=1000, completion_tokens=50, cached_tokens=600, cache_write_tokens=300)
    scripts = {
        "claude": [
            Reply(
                text="let me look",
                reasoning="hmm",
                tool_calls=[ScriptedToolCall("zoom", {"factor": 2})],
                usage=usage,
            ),
            HTTPError(529, "overloaded", retry_after="1"),
            Reply(tool_calls=[ScriptedToolCall("zoom", "not json")]),
        ]
    }
    with ScriptedServer(scripts) as server:
        url = f"{server.anthropic_base_url}/v1/messages"
        body = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "x"}]}
        with httpx.Client() as client:
            r1 = client.post(url, json=body, headers={"x-api-key": "ant-key"})
            r2 = client.post(url, json=body)
            r3 = client.post(url, json=body)
    d1 = r1.json()
    assert [b["type"] for b in d1["content"]] == ["thinking", "text", "tool_use"]
    assert d1["content"][2]["input"] == {"factor": 2} and d1["stop_reason"] == "tool_use"
    assert d1["usage"] == {
        "input_tokens": 100,
        "cache_read_input_tokens": 600,
        "cache_creation_input_tokens": 300,
        "output_tokens": 50,
    }
    assert r2.status_code == 529 and r2.headers["retry-after"] == "1"
    assert r2.json()["error"]["type"] == "overloaded_error"
    assert r3.json()["content"][0]["input"] == "not json"
    assert server.requests[0].auth_is("ant-key") and server.requests[0].headers["x-api-key"] == "<redacted>"


def test_delay_lets_a_client_time_out_and_stop_does_not_wait_for_it():
    with ScriptedServer({"m": [Delay(30.0), Delay(0.05, then="late but fine")]}) as server:
        url = f"{server.base_url}/chat/completions"
        body = {"model": "m", "messages": []}
        with httpx.Client() as client:
            with pytest.raises(httpx.ReadTimeout):
                client.post(url, json=body, timeout=0.2)
            r = client.post(url, json=body)
        assert r.json()["choices"][0]["message"]["content"] == "late but fine"
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 3.0  # the pending 30 s delay was cut short by stop()


async def test_usable_from_async_code_with_concurrent_requests():
    async with ScriptedServer(
        {"m": lambda req: Reply(text=req["messages"][0]["content"], delay_s=0.05)}
    ) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as client:

            async def ask(i):
                r = await client.post(
                    "/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": str(i)}]},
                )
                return r.json()["choices"][0]["message"]["content"]

            answers = await asyncio.gather(*(ask(i) for i in range(40)))
    assert answers == [str(i) for i in range(40)]
    assert len(server.requests) == 40


@tool
def read_total(region: str) -> str:
    """Read the total.

    Args:
        region: where to look.
    """
    return "42.17"


def photo() -> ImagePart:
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((64, 64)).save(buf, format="PNG")
    return ImagePart(buf.getvalue())


async def test_real_openai_endpoint_against_the_server():
    usage = ScriptedUsage(prompt_tokens=900, completion_tokens=60, cached_tokens=800, reasoning_tokens=40)

    def frontier(req):  # answers from what it was sent, like a real consult
        question = req["messages"][-1]["content"]
        return Reply(text=f"advice: {question} -> look at the bottom", usage=usage)

    scripts = {
        "flash": [
            HTTPError(429, "slow down", retry_after=0.05),
            Delay(5.0),  # longer than the endpoint's timeout: retried
            Reply(
                tool_calls=[ScriptedToolCall("read_total", {"region": "bottom"})],
                reasoning="find it",
                usage=usage,
            ),
            Reply(tool_calls=[ScriptedToolCall("read_total", '{"region": ')], usage=None),
        ],
        "frontier": frontier,
    }
    async with ScriptedServer(scripts) as server:
        cfg = EndpointConfig(provider="openai", model="flash", base_url=server.base_url, timeout_s=1.0)
        flash = make_endpoint("flash", cfg, backoff_s=0.001)
        t0 = time.perf_counter()
        r = await flash.complete(
            [Message.user("total?", images=[photo()])], tools=[read_total], effort="medium"
        )
        assert time.perf_counter() - t0 >= 0.05 + 1.0  # waited Retry-After, then the timeout
        assert [(a.status, a.ok) for a in r.attempts] == [(429, False), (None, False), (200, True)]
        assert r.attempts[0].retry_after_s == 0.05 and r.attempts[1].error.startswith("timeout after 1s")
        call = r.message.tool_calls[0]
        assert (call.name, call.arguments, r.message.reasoning) == (
            "read_total",
            {"region": "bottom"},
            "find it",
        )
        assert (r.usage.input, r.usage.cached_input, r.usage.output, r.usage.reasoning) == (100, 800, 20, 40)

        bad = await flash.complete([Message.user("again")], tools=[read_total])
        assert bad.message.tool_calls[0].arguments is None and bad.message.tool_calls[0].parse_error
        assert bad.usage.estimated and bad.usage.input > 0

        sent = server.requests_for("flash")[-2].body
        assert sent["reasoning_effort"] == "medium" and sent["tools"][0]["function"]["name"] == "read_total"
        assert sent["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")

        adv = make_endpoint(
            "frontier", EndpointConfig(provider="openai", model="frontier", base_url=server.base_url)
        )
        answers = await asyncio.gather(*(adv.complete([Message.user(f"q{i}")]) for i in range(40)))
        assert [a.message.text for a in answers] == [f"advice: q{i} -> look at the bottom" for i in range(40)]
        await flash.aclose()
        await adv.aclose()


async def test_real_anthropic_endpoint_against_the_server():
    usage = ScriptedUsage(prompt_tokens=1000, completion_tokens=50, cached_tokens=600, cache_write_tokens=300)
    scripts = {
        "claude": [HTTPError(529, "overloaded"), Reply(text="plan: crop first", reasoning="hmm", usage=usage)]
    }
    async with ScriptedServer(scripts) as server:
        cfg = server.endpoint_config("claude", "anthropic", max_tokens=512)
        assert cfg == EndpointConfig(
            provider="anthropic",
            model="claude",
            base_url=server.anthropic_base_url,
            free=True,
            max_tokens=512,
        )
        ep = make_endpoint("frontier", cfg, backoff_s=0.001)
        r = await ep.complete(
            [Message.system("advise"), Message.user("plan?", images=[photo()])], effort="high"
        )
        await ep.aclose()
    assert r.message.text == "plan: crop first" and r.message.reasoning == "hmm"
    assert [a.status for a in r.attempts] == [529, 200]
    u = r.usage
    assert (u.input, u.cached_input, u.cache_write, u.output, u.reasoning) == (100, 600, 300, 50, 0)
    body = server.requests[-1].body
    assert body["system"] == "advise" and body["thinking"]["budget_tokens"] == 16384
    assert body["messages"][0]["content"][1]["source"]["type"] == "base64"


async def test_streamed_replies_fold_into_the_same_response():
    usage = ScriptedUsage(prompt_tokens=500, completion_tokens=90, cached_tokens=400, reasoning_tokens=60)
    scripts = {
        "flash": [
            Reply(
                text="checking the bottom line",
                reasoning="the total is usually last",
                tool_calls=[
                    ScriptedToolCall("read_total", {"region": "bottom"}),
                    ScriptedToolCall("read_total", '{"region"'),
                ],
                usage=usage,
            ),
            Reply(text="42.17", usage=None),
        ]
    }
    async with ScriptedServer(scripts) as server:
        ep = make_endpoint("flash", server.endpoint_config("flash", extra_body={"stream": True}))
        r = await ep.complete([Message.user("total?")], tools=[read_total])
        plain = await ep.complete([Message.user("just the number")])
        await ep.aclose()
    sent = server.requests[0].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    m = r.message
    assert (m.text, m.reasoning, r.finish_reason) == (
        "checking the bottom line",
        "the total is usually last",
        "tool_calls",
    )
    good, bad = m.tool_calls
    assert good.arguments == {"region": "bottom"} and good.id.startswith("call_")
    assert bad.arguments is None and bad.raw_arguments == '{"region"' and bad.parse_error
    assert (r.usage.input, r.usage.cached_input, r.usage.output, r.usage.reasoning) == (100, 400, 30, 60)
    assert plain.message.text == "42.17" and plain.usage.estimated and plain.finish_reason == "stop"
