"""`advisor serve` end to end: the official `openai` SDK against the real server (uvicorn) on 127.0.0.1,
on a tiny random Step checkpoint with the project's test tokenizer."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from advisor.engine.serving.server import load_served, running  # noqa: E402

from tests.engine.serve_helpers import ADD, MESSAGES, Scripted, endless, idle, tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve_ckpt"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ckpt):
    served = load_served(str(ckpt), kv_blocks=256, max_model_len=1500, name="tiny")
    with running(served) as base:
        yield served, base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = httpx.get(server[1] + "/health").json()
    assert h["status"] == "ok" and h["kv_blocks"] > 0


def test_chat_stream_and_non_stream_agree_and_report_cached_tokens(client, server):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    once = client.chat.completions.create(**kw)
    choice = once.choices[0]
    assert choice.finish_reason in ("stop", "length")
    u = once.usage
    assert u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    text, reasoning, last = "", "", None
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    for ch in chunks:
        if ch.choices:
            d = ch.choices[0].delta
            text += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            last = ch.choices[0].finish_reason or last
    assert text == (choice.message.content or "")
    assert reasoning == (getattr(choice.message, "reasoning_content", None) or "")
    assert last == choice.finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == u.prompt_tokens
    # the second request with the same prompt read it from the prefix cache, in whole blocks of 16
    assert usage.prompt_tokens_details.cached_tokens == (u.prompt_tokens - 1) // 16 * 16 > 0
    idle(server[1])


def test_a_streamed_tool_call_arrives_as_tool_calls(client, server):
    served = server[0]
    script = (
        "adding</think>\nSure.<tool_call>\n<function=add>\n<parameter=a>\n2\n</parameter>\n"
        "<parameter=b>\n3\n</parameter>\n</function>\n</tool_call>"
    )
    with Scripted(served, script):
        stream = client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=[ADD], stream=True, reasoning_effort="low", max_tokens=200
        )
        calls, content, reasoning, finish = [], "", "", None
        for ch in stream:
            d = ch.choices[0].delta
            calls += d.tool_calls or []
            content += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            finish = ch.choices[0].finish_reason or finish
        once = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[ADD], max_tokens=200)
    (call,) = calls
    assert (
        call.index == 0
        and call.function.name == "add"
        and json.loads(call.function.arguments) == {"a": 2, "b": 3}
    )
    assert call.id and finish == "tool_calls" and content == "Sure." and reasoning == "adding"
    msg = once.choices[0].message
    assert once.choices[0].finish_reason == "tool_calls" and msg.content == "Sure."
    assert json.loads(msg.tool_calls[0].function.arguments) == {"a": 2, "b": 3}
    assert msg.reasoning_content == "adding"
    assert once.usage.completion_tokens_details.reasoning_tokens == len(served.tokenizer.encode("adding")) + 1


def test_completions_stream_and_non_stream(client):
    once = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="Once upon", max_tokens=8, stream=True, temperature=0
        )
    )
    assert streamed == once.choices[0].text and once.usage.completion_tokens > 0
    by_ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert by_ids.usage.prompt_tokens == 3


def test_bad_requests_are_openai_shaped_400s_and_the_server_lives_on(client, server):
    base = server[1]
    r = httpx.post(
        base + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="unknown model 'gpt-9'"):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match=r"temperature"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=7)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    long = [{"role": "user", "content": "word " * 1000}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=long)
    msg = e.value.body["message"]
    assert (
        "context length of 1500 tokens" in msg
        and "prompt is" in msg
        and e.value.body["code"] == "context_length_exceeded"
    )
    with pytest.raises(openai.BadRequestError, match=r"plus max_tokens \(1490\) exceeds"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1490)
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


def test_a_client_that_disconnects_mid_stream_cancels_its_request(server):
    base = server[1]
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 300, "stream": True, "temperature": 0}
    served = server[0]
    seen = 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 3:
                break
    assert seen == 3
    assert idle(base)["kv_blocks_in_use"] == 0
    assert served.llm.core.stats.prompt_tokens > 0


@pytest.mark.parametrize("route, n", [("chat", 1), ("chat", 2), ("completions", 1)])
def test_a_client_that_disconnects_before_a_non_streamed_reply_cancels_its_request(server, route, n):
    served, base = server
    body = {"model": "tiny", "max_tokens": 1400, "temperature": 0, "n": n}
    body.update({"messages": MESSAGES} if route == "chat" else {"prompt": "Once upon a time"})
    with endless(served) as fake:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(f"{base}/v1/{'chat/' if route == 'chat' else ''}completions", json=body, timeout=1.0)
        h = idle(base)  # polls with a deadline: the request left the running set, its blocks went back
    seqs = list(fake.seqs.values())
    assert len(seqs) == n and all(s.finish_reason == "abort" and 0 < len(s.output) < 1400 for s in seqs)
    assert h["kv_blocks_in_use"] == 0 and h["running"] == 0


def test_advisor_serve_runs_from_the_command_line(ckpt):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "advisor.cli", "serve", str(ckpt), "--port", str(port), "--kv-blocks", "64"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError("advisor serve did not come up")
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        (model,) = client.models.list().data
        assert model.id == str(ckpt)
        r = client.chat.completions.create(model=str(ckpt), messages=MESSAGES, max_tokens=4)
        assert r.usage.completion_tokens > 0
    finally:
        proc.terminate()
        proc.wait(20)


def test_advisor_serve_on_a_taken_port_says_so_before_loading_or_printing_an_address(ckpt):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "advisor.cli", "serve", str(ckpt), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 2
    assert done.stdout == ""  # no "on http://..." for a server that never listened
    (line,) = done.stderr.strip().splitlines()
    assert line == f"advisor serve: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_the_docs_streaming_example_prints_what_step_nano_says(capsys):
    # docs/serve.md's client, as a user pastes it, against `advisor serve step-nano`: a reasoning model's
    # reply streams as reasoning_content first, so printing only `content` printed nothing
    docs = (Path(__file__).resolve().parents[2] / "docs" / "serve.md").read_text()
    code = re.search(r"```python\n(.*?)```", docs, re.S).group(1)
    example = code.split("\nthree = ")[0]  # the streaming part
    served = load_served("step-nano", kv_blocks=128, max_model_len=1024, name="step-nano")
    with running(served) as base:
        exec(compile(example.replace("http://127.0.0.1:8000", base), "docs/serve.md", "exec"), {})
    assert capsys.readouterr().out.strip()
