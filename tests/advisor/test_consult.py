"""The consult core on its own (`advisor.consult`): scripted transcripts, a real frontier endpoint on
127.0.0.1, one ledger; what it decides, what it sends, what it books."""

import json

import pytest

from advisor.consult import ConsultBrief, Slot, consult, digest_entry, transcript_digest
from advisor.endpoints import make_endpoint
from advisor.endpoints.base import ChatRequest
from advisor.escalation import EscalationPolicy
from advisor.ledger import Ledger
from advisor.messages import Message, ToolCall
from advisor.pricing import Price
from advisor.task import Escalation
from advisor.testing import Reply, ScriptedServer, ScriptedUsage

PRICE = Price(input=5.0, cached_input=0.5, output=25.0)


def transcript() -> list[Message]:
    call = ToolCall(
        id="c1", name="shell", arguments={"cmd": "pytest -q"}, raw_arguments='{"cmd": "pytest -q"}'
    )
    return [
        Message.system("you are the executor"),
        Message.user("make the tests pass"),
        Message.assistant("", [call]),
        Message.tool("c1", "shell", "1 failed: test_sum", is_error=True),
    ]


@pytest.fixture
def frontier_server():
    with ScriptedServer({}) as server:
        yield server


async def _run(server, policy, *, max_usd=1.0, trigger="failures", max_tokens=None, ledger=None):
    ledger = ledger or Ledger(frontier_price=PRICE)
    endpoint = make_endpoint("frontier", server.endpoint_config("frontier", price=PRICE))
    slot = Slot("frontier", endpoint, PRICE, "high")
    messages = transcript()

    async def call(req: ChatRequest):
        resp = await endpoint.complete(req)
        ledger.record("frontier", "frontier", "consult", resp.usage, PRICE)
        return resp

    brief = ConsultBrief(trigger, "make the tests pass", ["shell"], transcript_digest(messages), failures=2)
    try:
        done = await consult(
            brief,
            policy=policy,
            frontier=slot,
            ledger=ledger,
            max_usd=max_usd,
            conversation=messages,
            call=call,
            max_tokens=max_tokens,
        )
    finally:
        await endpoint.aclose()
    return done, ledger


async def test_advice_is_made_booked_and_returned_as_data(frontier_server):
    frontier_server.script(
        "frontier",
        [Reply(text="  Fix sum() first.  ", usage=ScriptedUsage(prompt_tokens=1000, completion_tokens=100))],
    )
    policy = EscalationPolicy(Escalation(advice_max_tokens=321))
    policy.consecutive = 2
    done, ledger = await _run(frontier_server, policy)
    assert done.kind == "advice" and done.mode == "advise" and done.advice == "Fix sum() first."
    assert done.cost_usd == pytest.approx(1000 * 5.0 / 1e6 + 100 * 25.0 / 1e6)
    assert ledger.total_usd == pytest.approx(done.cost_usd)
    assert done.estimate_usd > 0
    assert policy.consults == 1 and policy.consecutive == 0  # counted; the streak starts over
    (req,) = frontier_server.requests_for("frontier")
    assert req.body["max_tokens"] == 321
    sent = json.dumps(req.body["messages"])
    assert "pytest -q" in sent and "1 failed: test_sum" in sent and "failed 2 steps in a row" in sent


async def test_the_executors_own_call_asks_even_in_takeover_mode_with_its_own_cap(frontier_server):
    frontier_server.script("frontier", ["Check the edge case n=0 before you finish."])
    policy = EscalationPolicy(Escalation(mode="takeover"))
    done, _ = await _run(frontier_server, policy, trigger="tool", max_tokens=2048)
    assert done.kind == "advice" and done.mode == "advise"
    (req,) = frontier_server.requests_for("frontier")
    assert req.body["max_tokens"] == 2048
    assert "asked for your advice" in json.dumps(req.body["messages"])


async def test_takeover_and_skips_make_no_call(frontier_server):
    policy = EscalationPolicy(Escalation(mode="takeover", takeover_steps=2, max_consults=1))
    done, ledger = await _run(frontier_server, policy)
    assert done.kind == "takeover" and done.mode == "takeover" and done.outcome.takeover_steps == 2
    assert done.advice is None and ledger.total_usd == 0
    again, _ = await _run(frontier_server, policy)
    assert again.kind == "skipped" and again.outcome.skip_reason == "max_consults"
    broke, _ = await _run(frontier_server, EscalationPolicy(Escalation()), max_usd=1e-9)
    assert broke.kind == "skipped" and broke.outcome.skip_reason == "budget"
    assert frontier_server.requests_for("frontier") == []


def test_one_digest_format_for_the_loop_and_the_proxy():
    assert digest_entry("python", {"code": "x" * 1000}, "", "ok", step=3).startswith(
        'step 3: python({"code": "xxx'
    )
    assert len(digest_entry("python", {"code": "x" * 1000}, "", "y" * 1000)) < 700
    assert digest_entry("crop", None, '{"box": [0', None) == 'crop({"box": [0) -> (no result)'
    lines = transcript_digest(transcript()).splitlines()
    assert lines == ["user: make the tests pass", 'shell({"cmd": "pytest -q"}) -> 1 failed: test_sum']
