"""Anthropic Messages endpoint: wire format, thinking, usage (respx)."""

import base64
import io
import json

import httpx
import respx
from advisor.tools.spec import tool
from PIL import Image
from skimage import data

from advisor.endpoints import EndpointConfig, make_endpoint
from advisor.messages import ImagePart, Message, TextPart, ToolCall

URL = "https://api.anthropic.com/v1/messages"


@tool
def zoom(factor: float) -> str:
    """Zoom in.

    Args:
        factor: magnification.
    """
    return "ok"


def jpeg(size=(80, 60)) -> ImagePart:
    buf = io.BytesIO()
    Image.fromarray(data.coffee()).resize(size).save(buf, format="JPEG")
    return ImagePart(buf.getvalue(), "image/jpeg")


def endpoint(**cfg):
    config = EndpointConfig(provider="anthropic", model="claude-x", **cfg)
    return make_endpoint("frontier", config, backoff_s=0.001)


def message(content: list, usage: dict | None = None, stop="end_turn") -> httpx.Response:
    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x-2026",
        "content": content,
        "stop_reason": stop,
    }
    if usage is not None:
        body["usage"] = usage
    return httpx.Response(200, json=body)


USAGE = {
    "input_tokens": 300,
    "cache_read_input_tokens": 2000,
    "cache_creation_input_tokens": 500,
    "output_tokens": 900,
}


@respx.mock
async def test_request_translation(monkeypatch):
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "ant-key-1")
    route = respx.post(URL).mock(return_value=message([{"type": "text", "text": "ok"}], USAGE))
    img, tool_img = jpeg(), jpeg((40, 30))
    history = [
        Message.system("you advise"),
        Message.system("be concise"),
        Message.user("look", images=[img]),
        Message.assistant(
            "zooming", [ToolCall("t1", "zoom", {"factor": 2.0}), ToolCall("t2", "zoom", None, "{bad", "bad")]
        ),
        Message("tool", [TextPart("zoomed to img_2"), tool_img], tool_call_id="t1", name="zoom"),
        Message.tool("t2", "zoom", "error: arguments are not valid JSON", is_error=True),
        Message.user("and now?"),
    ]
    ep = endpoint(
        api_key_env="TEST_ANTHROPIC_KEY", headers={"anthropic-beta": "x"}, extra_body={"temperature": 0.2}
    )
    await ep.complete(history, tools=[zoom], tool_choice="required", effort="high", max_tokens=100)
    body = json.loads(route.calls[0].request.content)
    headers = route.calls[0].request.headers
    assert headers["x-api-key"] == "ant-key-1" and headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "x" and "authorization" not in headers
    assert body["system"] == "you advise\n\nbe concise"
    assert body["tools"] == [zoom.anthropic_schema()] and body["tool_choice"] == {"type": "any"}
    assert "thinking" not in body and body["max_tokens"] == 100  # forced tool use: no thinking
    assert body["temperature"] == 0.2
    msgs = body["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"][0] == {"type": "text", "text": "look"}
    src = msgs[0]["content"][1]["source"]
    assert (
        msgs[0]["content"][1]["type"] == "image"
        and src["type"] == "base64"
        and src["media_type"] == "image/jpeg"
    )
    assert base64.b64decode(src["data"]) == img.data
    assert msgs[1]["content"] == [
        {"type": "text", "text": "zooming"},
        {"type": "tool_use", "id": "t1", "name": "zoom", "input": {"factor": 2.0}},
        {"type": "tool_use", "id": "t2", "name": "zoom", "input": {}},
    ]
    # both tool results and the next user text share one user turn, results first; images stay inside
    r1, r2, text = msgs[2]["content"]
    assert r1["type"] == "tool_result" and r1["tool_use_id"] == "t1" and "is_error" not in r1
    assert r1["content"][0] == {"type": "text", "text": "zoomed to img_2"}
    assert (
        r1["content"][1]["type"] == "image"
        and base64.b64decode(r1["content"][1]["source"]["data"]) == tool_img.data
    )
    assert r2["is_error"] is True and r2["tool_use_id"] == "t2"
    assert text == {"type": "text", "text": "and now?"}


@respx.mock
async def test_effort_maps_to_thinking_budget_and_base_url_v1_is_accepted():
    route = respx.post("http://proxy.test/v1/messages").mock(
        return_value=message([{"type": "text", "text": "ok"}], USAGE)
    )
    ep = make_endpoint(
        "f",
        EndpointConfig(provider="anthropic", model="c", base_url="http://proxy.test/v1/", max_tokens=2000),
        thinking_budgets={"low": None},
    )
    await ep.complete([Message.user("q")], effort="medium")
    await ep.complete([Message.user("q")], effort="low")
    await ep.complete([Message.user("q")])
    medium, low, none = (json.loads(c.request.content) for c in route.calls)
    assert medium["thinking"] == {"type": "enabled", "budget_tokens": 4096} and medium["max_tokens"] == 6096
    assert "thinking" not in low and low["max_tokens"] == 2000
    assert "thinking" not in none and none["max_tokens"] == 2000


@respx.mock
async def test_reply_usage_and_thinking_replayed_with_its_tool_turn():
    route = respx.post(URL)
    route.mock(
        side_effect=[
            message(
                [
                    {"type": "thinking", "thinking": "the scale is small", "signature": "SIG1"},
                    {"type": "text", "text": "zooming"},
                    {"type": "tool_use", "id": "tu1", "name": "zoom", "input": {"factor": 3}},
                    {"type": "tool_use", "id": "tu2", "name": "zoom", "input": "oops"},
                ],
                USAGE,
                stop="tool_use",
            ),
            message([{"type": "text", "text": "done"}], USAGE),
            message([{"type": "text", "text": "done"}], USAGE),
        ]
    )
    ep = endpoint()
    first = await ep.complete([Message.user("q")], tools=[zoom], effort="low")
    m = first.message
    assert m.text == "zooming" and m.reasoning == "the scale is small" and first.finish_reason == "tool_calls"
    good, bad = m.tool_calls
    assert good.arguments == {"factor": 3} and good.parse_error is None
    assert (
        bad.arguments is None and bad.raw_arguments == "oops" and "must be a JSON object" in bad.parse_error
    )
    u = first.usage
    assert (u.input, u.cached_input, u.cache_write, u.output, u.reasoning, u.estimated) == (
        300,
        2000,
        500,
        900,
        0,
        False,
    )

    # continuing that tool turn: its signed thinking block goes back first, and thinking stays on
    history = [
        Message.user("q"),
        m,
        Message.tool("tu1", "zoom", "ok"),
        Message.tool("tu2", "zoom", "error", True),
    ]
    await ep.complete(history, tools=[zoom], effort="low")
    body = json.loads(route.calls[1].request.content)
    assert body["messages"][1]["content"][0] == {
        "type": "thinking",
        "thinking": "the scale is small",
        "signature": "SIG1",
    }
    assert body["thinking"]["budget_tokens"] == 1024

    # a tool turn made by another model has no thinking block to send back: thinking is left off
    foreign = [
        Message.user("q"),
        Message.assistant("", [ToolCall("x1", "zoom", {"factor": 1})]),
        Message.tool("x1", "zoom", "ok"),
    ]
    await ep.complete(foreign, tools=[zoom], effort="high")
    body = json.loads(route.calls[2].request.content)
    assert "thinking" not in body and body["messages"][1]["content"][0]["type"] == "tool_use"


@respx.mock
async def test_missing_usage_is_estimated_with_thinking_as_output():
    respx.post(URL).mock(
        return_value=message(
            [
                {"type": "thinking", "thinking": "t" * 400, "signature": "s"},
                {"type": "text", "text": "a" * 40},
            ],
            None,
        )
    )
    r = await endpoint().complete([Message.user("q" * 2000, images=[jpeg((750, 300))])])
    u = r.usage
    assert u.estimated and u.reasoning == 0 and u.output == 110 and u.cache_write == 0
    assert 800 <= u.input <= 810  # 500 text + 300 image + overhead


@respx.mock
async def test_history_with_tool_turns_is_written_as_text_when_the_call_has_no_tools():
    route = respx.post(URL).mock(return_value=message([{"type": "text", "text": "advice"}], USAGE))
    img = jpeg((40, 30))
    history = [
        Message.system("you advise"),
        Message.user("total?"),
        Message.assistant("zooming", [ToolCall("x1", "zoom", {"factor": 2.0}, '{"factor": 2.0}')]),
        Message("tool", [TextPart("zoomed"), img], tool_call_id="x1", name="zoom", is_error=True),
        Message.user("what next?"),
    ]
    await endpoint().complete(history, effort="medium")
    body = json.loads(route.calls[0].request.content)
    assert "tools" not in body and body["thinking"]["budget_tokens"] == 4096
    kinds = [b["type"] for m in body["messages"] for b in m["content"]]
    assert "tool_use" not in kinds and "tool_result" not in kinds
    assert body["messages"][1]["content"] == [
        {"type": "text", "text": 'zooming\n[tool call x1: zoom({"factor": 2.0})]'}
    ]
    head, image, question = body["messages"][2]["content"]
    assert head == {"type": "text", "text": "[tool result x1: zoom (error)]\nzoomed"}
    assert image["type"] == "image" and base64.b64decode(image["source"]["data"]) == img.data
    assert question == {"type": "text", "text": "what next?"}
