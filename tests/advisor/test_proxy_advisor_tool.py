"""Anthropic's advisor tool (`advisor_20260301`) served by `advisor proxy` for any model pair: the
official `anthropic` SDK (beta messages, plain and streamed) against the proxy, with ScriptedServer
upstreams of both kinds on 127.0.0.1; and the OpenAI-wire form with the official `openai` SDK."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from advisor.messages import Usage
from advisor.proxy.sessions import JOURNAL
from advisor.testing import HTTPError, Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage
from tests.advisor.proxy_helpers import EXEC_PRICE, FRONTIER_PRICE, make_config, proxy_for

BETA = ["advisor-tool-2026-03-01"]
ADVICE = "Use a heap; check the empty input first."
EXEC_U = ScriptedUsage(300, 40)
ADV_U = ScriptedUsage(900, 120)


def advisor_tool(**over) -> dict:
    return {"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4-6", **over}


def asks() -> Reply:
    return Reply(text="Let me ask.", tool_calls=[ScriptedToolCall("advisor", {})], usage=EXEC_U)


@pytest.fixture
def upstream():
    with ScriptedServer({}) as server:
        yield server


def client_for(proxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.root_url, api_key="unused", max_retries=0)


def journal_consults(tmp_path) -> list[dict]:
    lines = (tmp_path / "sessions" / JOURNAL).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["type"] == "consult"]


@pytest.mark.parametrize("executor_provider", ["openai", "anthropic"])
def test_one_consult_plain_blocks_iterations_ledger_and_header(upstream, tmp_path, executor_provider):
    upstream.script("flash", [asks(), Reply(text="Done: heap-based.", usage=EXEC_U)])
    upstream.script("big", [Reply(text=ADVICE, reasoning="secret thoughts", usage=ADV_U)])
    cfg = make_config(upstream, tmp_path, executor_provider=executor_provider)
    with proxy_for(cfg) as proxy:
        raw = client_for(proxy).beta.messages.with_raw_response.create(
            model="claude-haiku-4-5",
            max_tokens=512,
            messages=[{"role": "user", "content": "Merge k sorted lists."}],
            tools=[advisor_tool(max_tokens=2048)],
            betas=BETA,
        )
        msg = raw.parse()
        assert raw.headers["x-advisor-consult"] == "tool=advice"
    assert [b.type for b in msg.content] == ["text", "server_tool_use", "advisor_tool_result", "text"]
    call, result = msg.content[1], msg.content[2]
    assert call.id.startswith("srvtoolu_") and call.name == "advisor" and call.input == {}
    assert result.tool_use_id == call.id
    assert result.content.type == "advisor_result" and result.content.text == ADVICE
    assert "secret" not in msg.model_dump_json()  # the advisor's thinking is dropped
    assert msg.content[3].text == "Done: heap-based." and msg.stop_reason == "end_turn"
    its = msg.usage.iterations
    assert [i.type for i in its] == ["message", "advisor_message", "message"]
    assert its[1].model == "big" and (its[1].input_tokens, its[1].output_tokens) == (900, 120)
    # top-level usage is the executor's (both of its calls)
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (600, 80)
    # the executor was offered a function tool `advisor` with no parameters; then got the advice as its result
    first, second = (r.body for r in upstream.requests_for("flash"))
    if executor_provider == "openai":
        (tool,) = first["tools"]
        assert tool["function"]["name"] == "advisor" and tool["function"]["parameters"]["properties"] == {}
        assert second["messages"][-1] == {"role": "tool", "tool_call_id": call.id, "content": ADVICE}
    else:
        (tool,) = first["tools"]
        assert tool["name"] == "advisor" and tool["input_schema"]["properties"] == {}
        (res,) = second["messages"][-1]["content"]
        assert res["type"] == "tool_result" and res["tool_use_id"] == call.id and ADVICE in json.dumps(res)
    (consult_req,) = upstream.requests_for("big")
    assert consult_req.body["max_tokens"] - consult_req.body["thinking"]["budget_tokens"] == 2048
    assert "Merge k sorted lists." in json.dumps(consult_req.body)
    # the ledger books the advisor call to the frontier role at its own price
    (consult,) = journal_consults(tmp_path)
    assert consult["trigger"] == "tool" and consult["kind"] == "advice"
    assert consult["cost_usd"] == pytest.approx(FRONTIER_PRICE.cost(Usage(input=900, output=120)))
    calls = [
        e
        for e in map(json.loads, (tmp_path / "sessions" / JOURNAL).read_text().splitlines())
        if e["type"] == "call"
    ]
    assert [(c["role"], c["purpose"]) for c in calls] == [
        ("executor", "step"),
        ("frontier", "consult"),
        ("executor", "step"),
    ]
    assert sum(c["cost_usd"] for c in calls if c["role"] == "executor") == pytest.approx(
        2 * (300 * EXEC_PRICE.input + 40 * EXEC_PRICE.output) / 1e6
    )


@pytest.mark.parametrize("executor_provider", ["openai", "anthropic"])
def test_streamed_deltas_pings_the_whole_result_block_and_iterations(upstream, tmp_path, executor_provider):
    upstream.script("flash", [asks(), Reply(text="Done: heap-based.", usage=EXEC_U)])
    upstream.script("big", [Reply(text=ADVICE, usage=ADV_U)])
    with proxy_for(make_config(upstream, tmp_path, executor_provider=executor_provider)) as proxy:
        events = list(
            client_for(proxy).beta.messages.create(
                model="claude-haiku-4-5",
                max_tokens=512,
                messages=[{"role": "user", "content": "Merge k sorted lists."}],
                tools=[advisor_tool()],
                betas=BETA,
                stream=True,
            )
        )
        upstream.script("flash", [asks(), Reply(text="Done again.", usage=EXEC_U)])
        upstream.script("big", [Reply(text=ADVICE, usage=ADV_U)])
        # the wire as sent (the SDK's iterator skips pings): event names in order
        with client_for(proxy).beta.messages.with_streaming_response.create(
            model="claude-haiku-4-5",
            max_tokens=512,
            messages=[{"role": "user", "content": "Merge k sorted lists, raw."}],
            tools=[advisor_tool()],
            betas=BETA,
            stream=True,
        ) as raw:
            names = [line[len("event: ") :] for line in raw.iter_lines() if line.startswith("event: ")]
        upstream.script("flash", [asks(), Reply(text="Done again.", usage=EXEC_U)])
        upstream.script("big", [Reply(text=ADVICE, usage=ADV_U)])
        with client_for(proxy).beta.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=512,
            messages=[{"role": "user", "content": "Merge k sorted lists, again."}],
            tools=[advisor_tool()],
            betas=BETA,
        ) as stream:
            final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    # pings while the advisor ran: after the server_tool_use block, before the result block
    starts_at = [i for i, n in enumerate(names) if n == "content_block_start"]
    assert "ping" in names[starts_at[1] : starts_at[2]]
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == [
        "text",
        "server_tool_use",
        "advisor_tool_result",
        "text",
    ]
    # the result block comes whole in its content_block_start, with no deltas of its own
    result = starts[2]
    assert result.content_block.content.text == ADVICE
    assert not [e for e in events if e.type == "content_block_delta" and e.index == result.index]
    # the executor's text came as deltas; its advisor call did not leak as a tool_use block
    texts = "".join(
        e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert texts == "Let me ask.Done: heap-based."
    (delta,) = [e for e in events if e.type == "message_delta"]
    assert [i.type for i in delta.usage.iterations] == ["message", "advisor_message", "message"]
    assert [b.type for b in final.content] == ["text", "server_tool_use", "advisor_tool_result", "text"]
    assert final.content[2].content.text == ADVICE
    # each executor call was streamed upstream too (the deltas passed on as they came)
    assert all(r.body.get("stream") for r in upstream.requests_for("flash"))


def test_max_uses_exceeded_on_the_third_call_and_a_failing_advisor_is_an_error_result(upstream, tmp_path):
    upstream.script("flash", [asks(), asks(), asks(), Reply(text="Finished.", usage=EXEC_U)])
    upstream.script("big", [Reply(text="first advice"), HTTPError(400, "advisor model exploded")])
    with proxy_for(make_config(upstream, tmp_path, escalation={"max_consults": 5})) as proxy:
        msg = client_for(proxy).beta.messages.create(
            model="claude-haiku-4-5",
            max_tokens=512,
            messages=[{"role": "user", "content": "Plan a trip."}],
            tools=[advisor_tool(max_uses=2)],
            betas=BETA,
        )
    results = [b.content for b in msg.content if b.type == "advisor_tool_result"]
    assert results[0].type == "advisor_result" and results[0].text == "first advice"
    assert results[1].type == "advisor_tool_result_error" and results[1].error_code == "unavailable"
    assert results[2].type == "advisor_tool_result_error" and results[2].error_code == "max_uses_exceeded"
    assert msg.content[-1].text == "Finished." and msg.stop_reason == "end_turn"
    assert len(upstream.requests_for("big")) == 2  # the third call never reached the advisor
    last = upstream.requests_for("flash")[-1].body["messages"]
    assert "max_uses_exceeded" in last[-1]["content"]
    assert [i.type for i in msg.usage.iterations].count("advisor_message") == 1
    assert [c["kind"] for c in journal_consults(tmp_path)] == ["advice", "error", "skipped"]


def test_a_second_turn_sends_the_blocks_back(upstream, tmp_path):
    upstream.script("flash", [asks(), Reply(text="Use a heap.", usage=EXEC_U), Reply(text="O(n log k).")])
    upstream.script("big", [Reply(text=ADVICE, usage=ADV_U)])
    with proxy_for(make_config(upstream, tmp_path)) as proxy:
        client = client_for(proxy)
        msgs = [{"role": "user", "content": "Merge k sorted lists."}]
        first = client.beta.messages.create(
            model="claude-haiku-4-5", max_tokens=512, messages=msgs, tools=[advisor_tool()], betas=BETA
        )
        msgs += [
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
            {"role": "user", "content": "And its complexity?"},
        ]
        second = client.beta.messages.create(
            model="claude-haiku-4-5", max_tokens=512, messages=msgs, tools=[advisor_tool()], betas=BETA
        )
    assert second.content[0].text == "O(n log k)." and not second.usage.iterations[1:]
    sent = upstream.requests_for("flash")[-1].body["messages"]
    call_id = first.content[1].id
    # the earlier consult, as the executor's call and its result, then the rest of that turn
    roles = [(m["role"], bool(m.get("tool_calls"))) for m in sent]
    assert roles == [
        ("user", False),
        ("assistant", True),
        ("tool", False),
        ("assistant", False),
        ("user", False),
    ]
    assert (
        sent[1]["tool_calls"][0]["id"] == call_id
        and sent[1]["tool_calls"][0]["function"]["name"] == "advisor"
    )
    assert sent[2] == {"role": "tool", "tool_call_id": call_id, "content": ADVICE}
    assert sent[3]["content"] == "Use a heap."


def test_openai_wire_advisor_tool(upstream, tmp_path):
    upstream.script("flash", [asks(), Reply(text="Done.", usage=EXEC_U)])
    upstream.script("big", [Reply(text=ADVICE, usage=ADV_U)])
    with proxy_for(make_config(upstream, tmp_path)) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="advisor",
            messages=[{"role": "user", "content": "Merge k sorted lists."}],
            tools=[{"type": "openrouter:advisor", "parameters": {"model": "any", "max_uses": 1}}],
        )
        resp = raw.parse()
        assert raw.headers["x-advisor-consult"] == "tool=advice"
    message = resp.choices[0].message
    assert message.content == "Let me ask.Done." and not message.tool_calls
    (call,) = message.model_extra["advisor_calls"]
    assert call["output"] == ADVICE and call["error_code"] is None
    assert [i["type"] for i in resp.usage.model_extra["iterations"]] == [
        "message",
        "advisor_message",
        "message",
    ]


def test_advisor_models_maps_the_tools_model_to_its_own_endpoint(upstream, tmp_path):
    from advisor.proxy.config import check_ready
    from advisor.task import TaskError

    upstream.script("flash", [asks(), Reply(text="Done.", usage=EXEC_U)])
    upstream.script("oracle", [Reply(text=ADVICE, usage=ADV_U)])
    oracle = upstream.endpoint_config("oracle", "openai", price=FRONTIER_PRICE).model_dump()
    cfg = make_config(upstream, tmp_path, advisor_models={"claude-opus-4-6": "oracle"})
    cfg.endpoints["oracle"] = type(cfg.endpoints["big"]).model_validate(oracle)
    check_ready(cfg, "proxy.yaml")
    with proxy_for(cfg) as proxy:
        msg = client_for(proxy).beta.messages.create(
            model="claude-haiku-4-5",
            max_tokens=512,
            messages=[{"role": "user", "content": "Merge k sorted lists."}],
            tools=[advisor_tool()],
            betas=BETA,
        )
    assert msg.content[2].content.text == ADVICE and msg.usage.iterations[1].model == "oracle"
    assert upstream.requests_for("big") == [] and len(upstream.requests_for("oracle")) == 1
    cfg.advisor_models["x"] = "nowhere"
    with pytest.raises(TaskError, match="advisor_models.x: unknown endpoint 'nowhere'"):
        check_ready(cfg, "proxy.yaml")


def test_openai_wire_streamed(upstream, tmp_path):
    upstream.script("flash", [asks(), Reply(text="Done.", usage=EXEC_U)])
    upstream.script("big", [Reply(text=ADVICE, usage=ADV_U)])
    with proxy_for(make_config(upstream, tmp_path)) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model="advisor",
                messages=[{"role": "user", "content": "Merge k sorted lists."}],
                tools=[{"type": "advisor", "model": "any"}],
                stream=True,
            )
        )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me ask.Done."
    assert not any(d.tool_calls for d in deltas)  # the advisor call is the proxy's, not the client's
    (call,) = [x for d in deltas for x in (d.model_extra or {}).get("advisor_calls", [])]
    assert call["output"] == ADVICE
    assert chunks[-1].choices[0].finish_reason == "stop"


# Claude Code 2.1.337's first request with `--advisor opus` (CLAUDE_CODE_ENABLE_EXPERIMENTAL_ADVISOR_TOOL=1),
# recorded from `claude -p` against a ScriptedServer; its long texts shortened
CLAUDE_CODE_REQUEST = Path(__file__).parent / "data" / "claude_code_advisor_request.json"
CLAUDE_CODE_VERSION = "2.1.337"


def claude_code_flash(body: dict) -> Reply:
    """The executor: asks the advisor once (when offered and not yet answered), then answers PONG."""
    offered = any(t["function"]["name"] == "advisor" for t in body.get("tools") or [])
    if offered and body["messages"][-1]["role"] != "tool":
        return Reply(tool_calls=[ScriptedToolCall("advisor", {})], usage=EXEC_U)
    return Reply(text="PONG", usage=EXEC_U)


def test_a_recorded_claude_code_advisor_request_replayed(upstream, tmp_path):
    body = json.loads(CLAUDE_CODE_REQUEST.read_text())
    assert {"type": "advisor_20260301", "name": "advisor"}.items() <= body["tools"][-1].items()
    upstream.script("flash", claude_code_flash)
    upstream.script("big", [Reply(text="ADVICE: say PONG", usage=ADV_U)])
    with proxy_for(make_config(upstream, tmp_path, models=["claude-*"])) as proxy:
        resp = httpx.post(
            proxy.root_url + "/v1/messages",
            json={**body, "stream": False},
            headers={"anthropic-beta": "advisor-tool-2026-03-01,claude-code-20250219", "x-api-key": "unused"},
            timeout=30,
        )
    assert resp.status_code == 200, resp.text
    msg = resp.json()
    assert [b["type"] for b in msg["content"]] == ["server_tool_use", "advisor_tool_result", "text"]
    assert msg["content"][1]["content"] == {"type": "advisor_result", "text": "ADVICE: say PONG"}
    assert [i["type"] for i in msg["usage"]["iterations"]] == ["message", "advisor_message", "message"]
    first = upstream.requests_for("flash")[0].body
    names = [t["function"]["name"] for t in first["tools"]]
    assert names[-1] == "advisor" and {"Bash", "Edit", "Read", "Write"} <= set(names)
    # Claude Code's mid-conversation system turn reached the executor as a system message
    assert [m["role"] for m in first["messages"]] == ["system", "user", "system"]


def claude_code() -> str | None:
    """Claude Code's CLI: $ADVISOR_CLAUDE_CODE, the copy .ci/run installs, or `claude` on PATH."""
    for candidate in (
        os.environ.get("ADVISOR_CLAUDE_CODE"),
        str(Path(__file__).resolve().parents[2] / ".ci" / "claude-code" / "node_modules" / ".bin" / "claude"),
        shutil.which("claude"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.mark.skipif(
    claude_code() is None, reason="Claude Code is not installed (.ci/run installs it with npm)"
)
def test_claude_code_headless_with_its_advisor_switch(upstream, tmp_path):
    upstream.script("flash", claude_code_flash)
    upstream.script("big", [Reply(text="ADVICE: say PONG", usage=ADV_U)])
    home = tmp_path / "home"
    home.mkdir()
    with proxy_for(make_config(upstream, tmp_path, models=["claude-*"])) as proxy:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "ANTHROPIC_BASE_URL": proxy.root_url,
            "ANTHROPIC_API_KEY": "sk-unused",
            "CLAUDE_CODE_ENABLE_EXPERIMENTAL_ADVISOR_TOOL": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1",
        }
        proc = subprocess.run(
            [
                claude_code(),
                "-p",
                "Say PONG",
                "--advisor",
                "opus",
                "--model",
                "haiku",
                "--output-format",
                "json",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["result"] == "PONG" and not out["is_error"]
    # Claude Code read the advisor's call from usage.iterations
    assert [i["type"] for i in out["usage"]["iterations"]] == ["message", "advisor_message", "message"]
    assert len(upstream.requests_for("big")) == 1
    assert all(r.path == "/v1/chat/completions" for r in upstream.requests_for("flash"))


def test_an_executor_that_keeps_asking_is_stopped_and_refusals_are_no_failures(upstream, tmp_path):
    upstream.script("flash", lambda body: asks())
    upstream.script("big", [Reply(text=ADVICE, usage=ADV_U)])
    with proxy_for(make_config(upstream, tmp_path, escalation={"after_failures": 1})) as proxy:
        client = client_for(proxy)
        msgs = [{"role": "user", "content": "Plan a trip."}]
        msg = client.beta.messages.create(
            model="claude-haiku-4-5",
            max_tokens=512,
            messages=msgs,
            tools=[advisor_tool(max_uses=1)],
            betas=BETA,
        )
        # max_uses + 2 calls answered, then the turn ends without the call (never a tool_use the client must run)
        assert len(upstream.requests_for("flash")) == 4 and len(upstream.requests_for("big")) == 1
        assert msg.stop_reason == "end_turn" and "tool_use" not in [b.type for b in msg.content]
        codes = [b.content.type for b in msg.content if b.type == "advisor_tool_result"]
        assert codes == ["advisor_result", *["advisor_tool_result_error"] * 2]
        # the error results sent back on the next turn are not the harness's tool failures
        upstream.script("flash", [Reply(text="Paris.")])
        msgs += [
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
            {"role": "user", "content": "Where to?"},
        ]
        raw = client.beta.messages.with_raw_response.create(
            model="claude-haiku-4-5",
            max_tokens=512,
            messages=msgs,
            tools=[advisor_tool(max_uses=1)],
            betas=BETA,
        )
        assert raw.parse().content[0].text == "Paris." and "x-advisor-consult" not in raw.headers
    events = [json.loads(x) for x in (tmp_path / "sessions" / JOURNAL).read_text().splitlines()]
    assert not [e for e in events if e["type"] == "step_failed"]


def test_no_advisor_endpoint_is_a_one_line_400(upstream, tmp_path):
    upstream.script("flash", [asks()])
    with proxy_for(make_config(upstream, tmp_path, frontier=None)) as proxy:
        with pytest.raises(
            anthropic.BadRequestError, match="no advisor for model 'claude-opus-4-6'.*advisor_models"
        ):
            client_for(proxy).beta.messages.create(
                model="claude-haiku-4-5",
                max_tokens=64,
                messages=[{"role": "user", "content": "hi"}],
                tools=[advisor_tool()],
                betas=BETA,
            )
    assert upstream.requests_for("flash") == []  # refused before any call
