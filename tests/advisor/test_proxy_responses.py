"""`POST /v1/responses` on the proxy, driven by the official `openai` SDK (`client.responses.create`:
plain, streamed, a function tool round trip through `previous_response_id`) and by the OpenAI Agents SDK
in its default Responses mode, against ScriptedServer upstreams of both kinds; bad input is a 400 in the
Responses error shape naming the field."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from advisor.messages import Usage
from advisor.testing import Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage
from tests.advisor.proxy_helpers import make_config, proxy_for

WEATHER = {
    "type": "function",
    "name": "weather",
    "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture
def upstream():
    with ScriptedServer() as server:
        yield server


def _sent(upstream: ScriptedServer, n: int, provider: str) -> list[dict]:
    """The n-th executor request's conversation, as (role, text-ish) dicts whatever the upstream wire."""
    body = upstream.requests_for("flash")[n].body
    if provider == "openai":
        return body["messages"]
    system = body.get("system")
    return ([{"role": "system", "content": system}] if system else []) + body["messages"]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_responses_plain_streamed_and_a_function_tool_round_trip(upstream, tmp_path, provider):
    upstream.script(
        "flash",
        [
            Reply(text="Hello there.", usage=ScriptedUsage(100, 5, cached_tokens=40)),
            Reply(
                reasoning="I need the weather tool.",
                tool_calls=[ScriptedToolCall("weather", {"city": "Paris"}, id="w1")],
                usage=ScriptedUsage(120, 12),
            ),
            Reply(text="It is sunny in Paris.", usage=ScriptedUsage(150, 9)),
        ],
    )
    cfg = make_config(upstream, tmp_path, executor_provider=provider, frontier_provider="openai")
    with proxy_for(cfg) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        raw = client.responses.with_raw_response.create(
            model="advisor", input="say hi", instructions="Be brief.", prompt_cache_key="conv-1"
        )
        assert raw.headers["x-advisor-role"] == "executor"
        assert raw.headers["x-advisor-session"] == "conv-1"
        plain = raw.parse()
        assert plain.status == "completed" and plain.output_text == "Hello there."
        assert plain.output[0].type == "message" and plain.instructions == "Be brief."
        assert (plain.usage.input_tokens, plain.usage.input_tokens_details.cached_tokens) == (100, 40)
        assert plain.usage.output_tokens == 5
        assert _sent(upstream, 0, provider)[0]["content"] in (
            "Be brief.",
            [{"type": "text", "text": "Be brief."}],
        )

        events = list(
            client.responses.create(
                model="advisor",
                input=[{"role": "user", "content": [{"type": "input_text", "text": "weather in Paris?"}]}],
                instructions="Use tools.",
                tools=[WEATHER],
                stream=True,
            )
        )
        assert [e.sequence_number for e in events] == list(range(len(events)))
        kinds = [e.type for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-1] == "response.completed"
        for kind in (
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
        ):
            assert kind in kinds
        if provider == "openai":  # Anthropic upstreams send thinking only with a signature to replay
            assert "response.reasoning_summary_text.delta" in kinds
        final = events[-1].response
        call = next(item for item in final.output if item.type == "function_call")
        assert (call.call_id, call.name, json.loads(call.arguments)) == ("w1", "weather", {"city": "Paris"})
        done = [e.item for e in events if e.type == "response.output_item.done"]
        assert [i.id for i in done] == [i.id for i in final.output]
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert json.loads(args) == {"city": "Paris"}

        answer = client.responses.create(
            model="advisor",
            previous_response_id=final.id,
            instructions="Use tools.",
            input=[{"type": "function_call_output", "call_id": "w1", "output": "sunny, 24 C"}],
            tools=[WEATHER],
        )
        assert answer.output_text == "It is sunny in Paris."
        assert answer.previous_response_id == final.id
    sent = _sent(upstream, 2, provider)
    flat = json.dumps(sent)
    assert "weather in Paris?" in flat and "sunny, 24 C" in flat and "Use tools." in flat
    if provider == "openai":
        assert sent[-1] == {"role": "tool", "tool_call_id": "w1", "content": "sunny, 24 C"}
        assert sent[-2]["tool_calls"][0]["id"] == "w1"
    else:
        assert sent[-1]["content"][0]["tool_use_id"] == "w1"
    sessions = proxy.router.store.sessions
    assert "conv-1" in sessions
    calls = [c for s in sessions.values() for c in s.ledger.calls]
    assert [c.role for c in calls] == ["executor"] * 3


def test_responses_items_passed_back_whole_and_incomplete(upstream, tmp_path):
    """Codex sends the whole conversation each time (store: false): reasoning, message, function_call
    and its output items become one assistant turn and its tool result; a cut answer is `incomplete`."""
    upstream.script("flash", [Reply(text="Done", finish_reason="length", usage=ScriptedUsage(50, 16))])
    with proxy_for(make_config(upstream, tmp_path, frontier_provider="openai")) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        resp = client.responses.create(
            model="advisor",
            store=False,
            max_output_tokens=16,
            input=[
                {"type": "message", "role": "developer", "content": "You are Codex."},
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "list files"}],
                },
                {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "use ls"}]},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Listing."}],
                },
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "shell",
                    "arguments": '{"command":["ls"]}',
                },
                {"type": "function_call_output", "call_id": "c1", "output": "a.py\nb.py"},
            ],
            tools=[{"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {}}}],
            reasoning={"effort": "medium", "summary": "auto"},
            metadata={"run": "7"},
        )
        assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
        assert resp.metadata == {"run": "7"} and resp.store is False
        with pytest.raises(openai.BadRequestError, match="previous_response_id"):
            client.responses.create(model="advisor", previous_response_id=resp.id, input="more")
    sent = upstream.requests_for("flash")[0].body
    assert sent["max_tokens"] == 16 or sent.get("max_completion_tokens") == 16
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "user", "assistant", "tool"]
    assistant = sent["messages"][2]
    assert assistant["content"] == "Listing." and assistant["tool_calls"][0]["function"]["name"] == "shell"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model": "advisor", "input": [{"type": "computer_call", "id": "x"}]}, "input[0].type"),
        (
            {
                "model": "advisor",
                "input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}],
            },
            "input[0].call_id",
        ),
        ({"model": "advisor", "input": "hi", "tools": [{"type": "file_search"}]}, "tools[0].type"),
        (
            {
                "model": "advisor",
                "input": "hi",
                "text": {"format": {"type": "json_schema", "name": "x", "schema": {}}},
            },
            "text.format.type",
        ),
        ({"model": "advisor", "input": "hi", "previous_response_id": "resp_missing"}, "previous_response_id"),
        ({"model": "advisor", "input": []}, "input"),
        ({"input": "hi"}, "model"),
        ({"model": "advisor", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        (
            {"model": "advisor", "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input[0].content[0].type",
        ),
    ],
)
def test_responses_bad_input_is_a_400_naming_the_field(upstream, tmp_path, body, field):
    upstream.script("flash", [Reply(text="still alive")])
    with proxy_for(make_config(upstream, tmp_path)) as proxy:
        with httpx.Client(base_url=proxy.base_url) as http:
            r = http.post("/responses", json=body)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["message"].startswith(f"advisor proxy: {field}:"), error["message"]
            assert "\n" not in error["message"]
            assert error["param"] == field
            ok = http.post("/responses", json={"model": "advisor", "input": "hi"})
            assert ok.status_code == 200 and ok.json()["output"][0]["content"][0]["text"] == "still alive"


def test_responses_malformed_body_and_json_404s_in_each_wire_shape(upstream, tmp_path):
    with proxy_for(make_config(upstream, tmp_path)) as proxy:
        with httpx.Client(base_url=proxy.root_url) as http:
            r = http.post("/v1/responses", content=b"{not json", headers={"content-type": "application/json"})
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
            r = http.post("/v1/responses/resp_1/cancel")
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
            r = http.get("/v1/messages/batches")
            assert r.status_code == 404 and r.json()["type"] == "error"
            assert r.json()["error"]["type"] == "not_found_error"
            r = http.post("/v1/embeddings", json={})
            assert r.status_code == 404 and "no route POST /v1/embeddings" in r.json()["error"]["message"]


def test_responses_stream_failure_is_response_failed(upstream, tmp_path):
    upstream.script("flash", lambda body: Reply(text="abcdefgh", cut_after=1))
    cfg = make_config(upstream, tmp_path)
    with proxy_for(cfg) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        events = list(client.responses.create(model="advisor", input="hi", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and "stream broke off" in events[-1].response.error.message
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "abcd"  # what came before the break was passed on


def test_openai_agents_sdk_default_responses_mode_through_the_proxy(upstream, tmp_path):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    runs: list[str] = []

    @agents.function_tool
    def run_tests(path: str) -> str:
        """Run the test suite.

        Args:
            path: the test folder
        """
        runs.append(path)
        if len(runs) <= 2:
            return f"FAILED {path}/test_math.py::test_add - AssertionError: 3 != 4\n1 failed, 4 passed"
        return "5 passed in 0.12s"

    upstream.script(
        "flash",
        [
            Reply(
                tool_calls=[ScriptedToolCall("run_tests", {"path": "tests"})], usage=ScriptedUsage(400, 30)
            ),
            Reply(
                tool_calls=[ScriptedToolCall("run_tests", {"path": "tests/unit"})],
                usage=ScriptedUsage(450, 30),
            ),
            lambda body: Reply(
                tool_calls=[ScriptedToolCall("run_tests", {"path": "tests/fixed"})],
                text="following the advice" if "fix add()" in json.dumps(body) else "no advice seen",
                usage=ScriptedUsage(500, 30),
            ),
            Reply(text="All tests pass now.", usage=ScriptedUsage(550, 30)),
        ],
    )
    upstream.script("big", [Reply(text="fix add() in math.py: it subtracts", usage=ScriptedUsage(600, 80))])
    cfg = make_config(upstream, tmp_path, escalation={"after_failures": 2, "mode": "advise"})
    with proxy_for(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        # the model class the SDK uses by default (its default API is Responses), without global settings
        model = agents.OpenAIResponsesModel(model="advisor", openai_client=client)
        agent = agents.Agent(
            name="fixer", instructions="Fix the failing tests. Use run_tests.", tools=[run_tests], model=model
        )
        result = asyncio.run(agents.Runner.run(agent, "make the tests pass", max_turns=8))
        hits = upstream.requests_for("flash")
    assert result.final_output == "All tests pass now."
    assert runs == ["tests", "tests/unit", "tests/fixed"]
    (session,) = proxy.router.store.sessions.values()
    assert [(c.trigger, c.kind) for c in session.consults] == [("failures", "advice")]
    assert [c.role for c in session.ledger.calls] == [
        "executor",
        "executor",
        "frontier",
        "executor",
        "executor",
    ]
    assert session.ledger.tokens("executor") == Usage(input=1900, output=120)
    agent_usage = result.context_wrapper.usage
    assert agent_usage.requests == 4 and agent_usage.input_tokens == 1900
    assert "fix add() in math.py" in json.dumps(hits[2].body["messages"])


def test_codex_tool_shapes_namespace_flattened_and_web_search_left_out(upstream, tmp_path):
    """Codex 0.171 offers function tools, a `namespace` of function tools and a hosted web_search."""
    upstream.script("flash", [Reply(text="ok")])
    fn = {"type": "function", "name": "exec_command", "parameters": {"type": "object", "properties": {}}}
    inner = {"type": "function", "name": "close_agent", "parameters": {"type": "object", "properties": {}}}
    tools = [
        fn,
        {"type": "namespace", "name": "multi_agent_v1", "description": "agents", "tools": [inner]},
        {"type": "web_search", "external_web_access": False},
    ]
    with proxy_for(make_config(upstream, tmp_path)) as proxy:
        with httpx.Client(base_url=proxy.base_url) as http:
            r = http.post("/responses", json={"model": "advisor", "input": "hi", "tools": tools})
            assert r.status_code == 200, r.text
            bad = {"type": "namespace", "name": "x", "tools": [{"type": "web_search"}]}
            r = http.post("/responses", json={"model": "advisor", "input": "hi", "tools": [bad]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].tools[0].type"
    sent = upstream.requests_for("flash")[0].body["tools"]
    assert [t["function"]["name"] for t in sent] == ["exec_command", "close_agent"]


def test_the_sdks_stream_helper_accumulates_the_same_response(upstream, tmp_path):
    """`client.responses.stream()` rebuilds the response from the events and checks their order."""
    call = ScriptedToolCall("weather", {"city": "Oslo"}, id="c9")
    upstream.script("flash", [Reply(text="Let me check.", reasoning="think", tool_calls=[call])])
    with proxy_for(make_config(upstream, tmp_path)) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        with client.responses.stream(model="advisor", input="weather?", tools=[WEATHER]) as stream:
            final = stream.get_final_response()
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert final.output_text == "Let me check." and final.output[0].summary[0].text == "think"
    assert (final.output[2].call_id, json.loads(final.output[2].arguments)) == ("c9", {"city": "Oslo"})
