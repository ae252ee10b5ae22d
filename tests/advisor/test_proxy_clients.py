"""The proxy driven by the clients people run: the official `openai` and `anthropic` SDKs (streamed tool
calls included) and the OpenAI Agents SDK running a multi-step tool-using conversation."""

from __future__ import annotations

import asyncio
import json

import anthropic
import openai
import pytest

from advisor.messages import Usage
from advisor.testing import Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage
from tests.advisor.proxy_helpers import EXEC_PRICE, FRONTIER_PRICE, make_config, proxy_for

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
def upstream():
    with ScriptedServer() as server:
        yield server


def test_openai_sdk_plain_and_streamed_tool_calls(upstream, tmp_path):
    call = ScriptedToolCall("weather", {"city": "Paris"}, id="w1")
    upstream.script(
        "flash",
        [
            Reply(tool_calls=[call], usage=ScriptedUsage(120, 12)),
            Reply(tool_calls=[call], usage=ScriptedUsage(130, 13)),
            Reply(text="It is sunny in Paris.", usage=ScriptedUsage(150, 9)),
        ],
    )
    with proxy_for(make_config(upstream, tmp_path, frontier_provider="openai")) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "weather in Paris?"}]
        raw = client.chat.completions.with_raw_response.create(
            model="advisor", messages=msgs, tools=[WEATHER]
        )
        assert raw.headers["x-advisor-role"] == "executor"
        first = raw.parse()
        tc = first.choices[0].message.tool_calls[0]
        assert (tc.id, tc.function.name, json.loads(tc.function.arguments)) == (
            "w1",
            "weather",
            {"city": "Paris"},
        )
        assert first.usage.prompt_tokens == 120 and first.usage.completion_tokens == 12
        stream = client.chat.completions.create(
            model="advisor",
            messages=msgs,
            tools=[WEATHER],
            stream=True,
            stream_options={"include_usage": True},
        )
        name, args, finish, usage = "", "", None, None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                for d in choice.delta.tool_calls or []:
                    name += d.function.name or ""
                    args += d.function.arguments or ""
                finish = choice.finish_reason or finish
        assert (name, json.loads(args), finish) == ("weather", {"city": "Paris"}, "tool_calls")
        assert usage.prompt_tokens == 130
        msgs += [
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": "w1", "content": "sunny"},
        ]
        final = client.chat.completions.create(model="advisor", messages=msgs, tools=[WEATHER])
        assert final.choices[0].message.content == "It is sunny in Paris."
        with pytest.raises(openai.NotFoundError, match="unknown model 'gpt-x'"):
            client.chat.completions.create(model="gpt-x", messages=msgs)
    sent = upstream.requests_for("flash")[2].body["messages"]
    assert sent[-1] == {"role": "tool", "tool_call_id": "w1", "content": "sunny"}


def test_anthropic_sdk_plain_and_streamed_tool_use_on_an_openai_upstream(upstream, tmp_path):
    call = ScriptedToolCall("weather", {"city": "Oslo"}, id="toolu_9")
    upstream.script(
        "flash",
        [
            Reply(text="Checking.", tool_calls=[call], usage=ScriptedUsage(200, 20, cached_tokens=50)),
            Reply(text="Checking.", tool_calls=[call], usage=ScriptedUsage(210, 21)),
            Reply(text="Snow in Oslo.", usage=ScriptedUsage(250, 5)),
        ],
    )
    tools = [{"name": "weather", "description": "weather", "input_schema": WEATHER["function"]["parameters"]}]
    with proxy_for(make_config(upstream, tmp_path)) as proxy:
        client = anthropic.Anthropic(base_url=proxy.root_url, api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "weather in Oslo?"}]
        msg = client.messages.create(model="claude-sonnet-4-5", max_tokens=256, messages=msgs, tools=tools)
        assert msg.stop_reason == "tool_use"
        assert [b.type for b in msg.content] == ["text", "tool_use"]
        assert msg.content[1].input == {"city": "Oslo"} and msg.content[1].id == "toolu_9"
        assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (
            150,
            50,
            20,
        )
        with client.messages.stream(
            model="claude-sonnet-4-5", max_tokens=256, messages=msgs, tools=tools
        ) as stream:
            streamed = stream.get_final_message()
        assert streamed.stop_reason == "tool_use" and streamed.content[1].input == {"city": "Oslo"}
        assert streamed.usage.output_tokens == 21
        msgs += [
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "snow"}],
            },
        ]
        final = client.messages.create(model="claude-sonnet-4-5", max_tokens=256, messages=msgs, tools=tools)
        assert final.content[0].text == "Snow in Oslo." and final.stop_reason == "end_turn"
        with pytest.raises(anthropic.BadRequestError, match="messages"):
            client.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=[])


def test_openai_agents_sdk_failure_streak_consults_the_frontier_and_the_ledger_matches(upstream, tmp_path):
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

    exec_usage = [ScriptedUsage(400 + 50 * i, 30, cached_tokens=100 * i) for i in range(4)]
    frontier_usage = ScriptedUsage(600, 80)
    upstream.script(
        "flash",
        [
            Reply(tool_calls=[ScriptedToolCall("run_tests", {"path": "tests"})], usage=exec_usage[0]),
            Reply(tool_calls=[ScriptedToolCall("run_tests", {"path": "tests/unit"})], usage=exec_usage[1]),
            # the consult's advice is in this request: the executor follows it
            lambda body: Reply(
                tool_calls=[ScriptedToolCall("run_tests", {"path": "tests/fixed"})],
                usage=exec_usage[2],
                text="following the advice" if "fix add()" in json.dumps(body) else "no advice seen",
            ),
            Reply(text="All tests pass now.", usage=exec_usage[3]),
        ],
    )
    upstream.script("big", [Reply(text="fix add() in math.py: it subtracts", usage=frontier_usage)])
    cfg = make_config(upstream, tmp_path, escalation={"after_failures": 2, "mode": "advise"})
    with proxy_for(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        agent = agents.Agent(
            name="fixer",
            instructions="Fix the failing tests. Use run_tests.",
            tools=[run_tests],
            model=agents.OpenAIChatCompletionsModel(model="advisor", openai_client=client),
        )
        result = asyncio.run(agents.Runner.run(agent, "make the tests pass", max_turns=8))
    assert result.final_output == "All tests pass now."
    assert runs == ["tests", "tests/unit", "tests/fixed"]
    (session,) = proxy.router.store.sessions.values()
    assert session.policy.consults == 1
    assert [(c.trigger, c.kind) for c in session.consults] == [("failures", "advice")]
    assert [c.role for c in session.ledger.calls] == [
        "executor",
        "executor",
        "frontier",
        "executor",
        "executor",
    ]

    def usage(u: ScriptedUsage) -> Usage:
        return Usage(
            input=u.prompt_tokens - u.cached_tokens, cached_input=u.cached_tokens, output=u.completion_tokens
        )

    want_exec = sum((usage(u) for u in exec_usage), Usage())
    assert session.ledger.tokens("executor") == want_exec
    assert session.ledger.tokens("frontier") == usage(frontier_usage)
    assert session.ledger.cost("executor") == pytest.approx(
        sum(EXEC_PRICE.cost(usage(u)) for u in exec_usage)
    )
    assert session.ledger.cost("frontier") == pytest.approx(FRONTIER_PRICE.cost(usage(frontier_usage)))
    # what the agent framework counted is what the executor upstream reported (the consult is the proxy's)
    agent_usage = result.context_wrapper.usage
    assert agent_usage.requests == 4
    assert agent_usage.input_tokens == sum(u.prompt_tokens for u in exec_usage)
    assert agent_usage.output_tokens == sum(u.completion_tokens for u in exec_usage)
    third = upstream.requests_for("flash")[2].body["messages"]
    assert "fix add() in math.py" in json.dumps(third[-1])
