"""OpenAI-compatible endpoint: wire format in both directions (respx)."""

import io
import json

import httpx
import pytest
import respx
from advisor.tools.spec import tool
from PIL import Image
from skimage import data

from advisor.endpoints import EndpointConfig, EndpointError, make_endpoint
from advisor.endpoints.openai import to_openai_messages
from advisor.messages import ImagePart, Message, ToolCall

URL = "http://llm.test/v1/chat/completions"


@tool
def crop(box: list[int], scale: float = 1.0) -> str:
    """Crop a region.

    Args:
        box: x0, y0, x1, y1 in pixels.
        scale: zoom factor.
    """
    return "ok"


def png(size=(96, 64)) -> ImagePart:
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize(size).save(buf, format="PNG")
    return ImagePart(buf.getvalue(), "image/png", "img_0")


def endpoint(**cfg):
    config = EndpointConfig(provider="openai", model="step-3.7-flash", base_url="http://llm.test/v1", **cfg)
    return make_endpoint("flash", config, backoff_s=0.001)


def reply(message: dict, usage: dict | None = None, finish="stop") -> httpx.Response:
    body = {
        "id": "x",
        "model": "step-3.7-flash-0401",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return httpx.Response(200, json=body)


def test_messages_translate_with_tool_images_moved_after_the_tool_run():
    img, tool_img = png(), png((32, 32))
    messages = [
        Message.system("be brief"),
        Message.user("what is the total?", images=[img]),
        Message.assistant(
            "",
            [
                ToolCall("c1", "crop", {"box": [0, 0, 10, 10]}, '{"box": [0, 0, 10, 10]}'),
                ToolCall("c2", "crop", None, '{"box": [0,', "arguments are not valid JSON"),
            ],
        ),
        Message(
            "tool",
            [Message.tool("c1", "crop", "cropped to img_1").content[0], tool_img],
            tool_call_id="c1",
            name="crop",
        ),
        Message.tool("c2", "crop", "error: arguments are not valid JSON", is_error=True),
        Message.user("continue"),
    ]
    wire = to_openai_messages(messages)
    assert [m["role"] for m in wire] == ["system", "user", "assistant", "tool", "tool", "user", "user"]
    assert wire[0] == {"role": "system", "content": "be brief"}
    assert wire[1]["content"][0] == {"type": "text", "text": "what is the total?"}
    assert wire[1]["content"][1] == {"type": "image_url", "image_url": {"url": img.data_url()}}
    assert wire[1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,iVBOR")
    calls = wire[2]["tool_calls"]
    assert wire[2]["content"] is None
    assert calls[0] == {
        "id": "c1",
        "type": "function",
        "function": {"name": "crop", "arguments": '{"box": [0, 0, 10, 10]}'},
    }
    assert calls[1]["function"]["arguments"] == "{}"  # unparseable arguments are not replayed verbatim
    # tool messages stay text only and adjacent; the tool's image follows them in one user message
    assert wire[3] == {"role": "tool", "tool_call_id": "c1", "content": "cropped to img_1"}
    assert wire[4]["content"] == "error: arguments are not valid JSON"
    moved = wire[5]["content"]
    assert moved[0]["type"] == "text" and "c1" in moved[0]["text"] and "crop" in moved[0]["text"]
    assert moved[1] == {"type": "image_url", "image_url": {"url": tool_img.data_url()}}
    assert wire[6] == {"role": "user", "content": "continue"}


@respx.mock
async def test_request_body_and_headers(monkeypatch):
    monkeypatch.setenv("TEST_FLASH_KEY", "sk-flash-123")
    route = respx.post(URL).mock(
        return_value=reply(
            {"role": "assistant", "content": "ok"}, {"prompt_tokens": 5, "completion_tokens": 1}
        )
    )
    ep = endpoint(
        api_key_env="TEST_FLASH_KEY",
        max_tokens=256,
        headers={"X-Title": "advisor"},
        extra_body={"top_k": 20, "temperature": 0.6},
    )
    await ep.complete([Message.user("hi")], tools=[crop], tool_choice="required", effort="high")
    await ep.complete([Message.user("hi")], max_tokens=32)
    await ep.aclose()
    first, second = (json.loads(c.request.content) for c in route.calls)
    assert first["model"] == "step-3.7-flash"
    assert first["tools"] == [crop.openai_schema()] and first["tools"][0]["function"]["parameters"][
        "required"
    ] == ["box"]
    assert first["tool_choice"] == "required" and first["reasoning_effort"] == "high"
    assert first["max_tokens"] == 256 and first["top_k"] == 20 and first["temperature"] == 0.6
    assert "tools" not in second and "tool_choice" not in second and "reasoning_effort" not in second
    assert second["max_tokens"] == 32
    headers = route.calls[0].request.headers
    assert headers["authorization"] == "Bearer sk-flash-123" and headers["x-title"] == "advisor"


@respx.mock
async def test_reply_parsing_and_usage_split():
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "prompt_tokens_details": {"cached_tokens": 1000},
        "completion_tokens_details": {"reasoning_tokens": 250},
    }
    message = {
        "role": "assistant",
        "content": "looking",
        "reasoning": "the receipt total is at the bottom",
        "tool_calls": [
            {
                "id": "a",
                "type": "function",
                "function": {"name": "crop", "arguments": '{"box": [1, 2, 3, 4]}'},
            },
            {"id": "b", "type": "function", "function": {"name": "crop", "arguments": '{"box": [1, 2'}},
            {"id": "c", "type": "function", "function": {"name": "crop", "arguments": "[1, 2]"}},
        ],
    }
    respx.post(URL).mock(return_value=reply(message, usage, "tool_calls"))
    r = await endpoint().complete([Message.user("total?")], tools=[crop])
    assert r.message.role == "assistant" and r.message.text == "looking"
    assert r.message.reasoning == "the receipt total is at the bottom"
    assert r.finish_reason == "tool_calls" and r.model == "step-3.7-flash-0401"
    good, bad, wrong_type = r.message.tool_calls
    assert good.arguments == {"box": [1, 2, 3, 4]} and good.parse_error is None
    assert (
        bad.arguments is None and bad.raw_arguments == '{"box": [1, 2' and "not valid JSON" in bad.parse_error
    )
    assert wrong_type.arguments is None and "must be a JSON object" in wrong_type.parse_error
    u = r.usage
    assert (u.input, u.cached_input, u.cache_write, u.output, u.reasoning, u.estimated) == (
        200,
        1000,
        0,
        50,
        250,
        False,
    )
    assert len(r.attempts) == 1 and r.attempts[0].ok and r.attempts[0].usage == u


@respx.mock
async def test_reasoning_content_field_and_deepseek_cache_field():
    message = {"role": "assistant", "content": None, "reasoning_content": "thinking..."}
    usage = {"prompt_tokens": 50, "completion_tokens": 10, "prompt_cache_hit_tokens": 20}
    respx.post(URL).mock(return_value=reply(message, usage))
    r = await endpoint().complete([Message.user("q")])
    assert r.message.text == "" and r.message.reasoning == "thinking..."
    assert (r.usage.input, r.usage.cached_input, r.usage.output) == (30, 20, 10)


@respx.mock
async def test_missing_usage_is_estimated_never_zero():
    respx.post(URL).mock(
        return_value=reply({"role": "assistant", "content": "x" * 400, "reasoning_content": "y" * 80})
    )
    text_only = await endpoint().complete([Message.user("a" * 4000)])
    with_image = await endpoint().complete([Message.user("a" * 4000, images=[png((750, 400))])])
    u = text_only.usage
    assert u.estimated and u.cached_input == 0
    assert 1000 <= u.input <= 1020  # 4000 chars / 4 plus per-message overhead
    assert (u.output, u.reasoning) == (100, 20)
    assert with_image.usage.input - u.input == 400  # 750*400/750 tokens for the image
    assert text_only.attempts[0].usage.estimated


@respx.mock
async def test_200_with_an_error_body_is_retried_when_transient():
    respx.post(URL).mock(
        side_effect=[
            httpx.Response(200, json={"error": {"message": "upstream failed", "code": 502}}),
            reply({"role": "assistant", "content": "fine"}, {"prompt_tokens": 1, "completion_tokens": 1}),
        ]
    )
    r = await endpoint().complete([Message.user("q")])
    assert r.message.text == "fine"
    assert [a.ok for a in r.attempts] == [False, True] and "upstream failed" in r.attempts[0].error


@respx.mock
async def test_invalid_body_fails_without_retry():
    route = respx.post(URL).mock(return_value=httpx.Response(200, text="<html>gateway</html>"))
    with pytest.raises(EndpointError, match="invalid response") as exc:
        await endpoint().complete([Message.user("q")])
    assert route.call_count == 1 and len(exc.value.attempts) == 1
    assert "\n" not in str(exc.value)


async def test_unencodable_body_is_a_clear_error_before_any_request():
    ep = endpoint(extra_body={"temperature": float("nan")})
    with respx.mock(assert_all_called=False) as mock:
        route = mock.post(URL)
        with pytest.raises(
            EndpointError, match=r"^endpoint 'flash': request body is not valid JSON: Out of range float"
        ):
            await ep.complete([Message.user("q")])
    assert route.call_count == 0


def sse(*chunks: str) -> httpx.Response:
    return httpx.Response(
        200, text="".join(f"{c}\n\n" for c in chunks), headers={"content-type": "text/event-stream"}
    )


@respx.mock
async def test_stream_cut_short_is_retried_and_error_chunks_are_reported():
    delta = '{"model":"m","choices":[{"index":0,"delta":{"content":"par"},"finish_reason":null}]}'
    end = '{"model":"m","choices":[{"index":0,"delta":{"content":"tial"},"finish_reason":"stop"}]}'
    route = respx.post(URL).mock(
        side_effect=[
            sse(f"data: {delta}"),  # connection closed before finish_reason / [DONE]
            sse('data: {"error": {"message": "backend crashed", "code": 503}}'),
            sse(": keep-alive", f"data: {delta}", "event: x", f"data: {end}", "data: [DONE]"),
        ]
    )
    ep = make_endpoint(
        "flash",
        EndpointConfig(provider="openai", model="m", base_url="http://llm.test/v1"),
        backoff_s=0.001,
        stream=True,
    )
    r = await ep.complete([Message.user("q")])
    assert route.call_count == 3 and r.message.text == "partial" and r.usage.estimated
    first, second, third = r.attempts
    assert "stream ended before" in first.error and "backend crashed" in second.error and third.ok


@respx.mock
async def test_broken_stream_chunk_is_not_retried():
    route = respx.post(URL).mock(return_value=sse("data: {not json"))
    ep = make_endpoint(
        "flash", EndpointConfig(provider="openai", model="m", base_url="http://llm.test/v1"), stream=True
    )
    with pytest.raises(EndpointError, match="invalid stream chunk"):
        await ep.complete([Message.user("q")])
    assert route.call_count == 1


def test_openai_endpoint_needs_a_base_url():
    with pytest.raises(EndpointError, match=r"^endpoint 'flash': openai endpoint needs base_url"):
        make_endpoint("flash", EndpointConfig(provider="openai", model="m"))
    ep = make_endpoint("flash", EndpointConfig(provider="openai", model="m", base_url="http://h:1/v1/"))
    assert (
        ep.base_url == "http://h:1/v1"
        and repr(ep) == "OpenAIEndpoint(name='flash', model='m', base_url='http://h:1/v1')"
    )
