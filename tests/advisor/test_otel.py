"""OpenTelemetry export against a real OTLP/http receiver on 127.0.0.1 (the protobuf decoded with
opentelemetry-proto): the span tree and attributes of a run with a tool call and a consult, content only
when asked for, no key ever, and nothing of OpenTelemetry imported when it is off."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from advisor import Advisor, Task, tool
from advisor.cli import main
from advisor.testing import Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage

SECRET = "sk-otel-secret-0123456789"
GOAL = "Add 2 and 3 with the add tool. Answer with the number only."
EXEC_USAGE = ScriptedUsage(prompt_tokens=120, cached_tokens=20, completion_tokens=8)
FRONT_USAGE = ScriptedUsage(prompt_tokens=300, completion_tokens=40)


class Receiver:
    """A minimal OTLP/http trace receiver: POST /v1/traces, protobuf body."""

    def __init__(self):
        self.requests: list[ExportTraceServiceRequest] = []
        self.raw: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
                outer.raw.append(body)
                outer.requests.append(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def spans(self) -> list[dict]:
        out = []
        for req in self.requests:
            for rs in req.resource_spans:
                service = {a.key: _value(a.value) for a in rs.resource.attributes}.get("service.name")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append(
                            {
                                "name": s.name,
                                "trace": s.trace_id.hex(),
                                "id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex() or None,
                                "start": s.start_time_unix_nano,
                                "end": s.end_time_unix_nano,
                                "attrs": {a.key: _value(a.value) for a in s.attributes},
                                "events": [e.name for e in s.events],
                                "service": service,
                            }
                        )
        return out


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind)


@pytest.fixture
def receiver(monkeypatch):
    r = Receiver()
    r.thread.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", r.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    yield r
    r.server.shutdown()


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first
        b: second
    """
    return a + b


def executor(body: dict) -> Reply:
    text = json.dumps(body)
    if '"role": "tool"' not in text:
        return Reply(tool_calls=[ScriptedToolCall("add", {"a": 2, "b": 3})], usage=EXEC_USAGE)
    if "ADVICE" not in text:
        return Reply(text="Answer: 1", usage=EXEC_USAGE)  # wrong: the check rejects it, a consult follows
    return Reply(text="Answer: 5", usage=EXEC_USAGE)


def frontier(body: dict) -> Reply:
    return Reply(text="ADVICE: the tool said 5.", usage=FRONT_USAGE)


def make_task(server: ScriptedServer) -> Task:
    flash = {"input": 0.20, "cached_input": 0.04, "output": 1.15}
    front = {"input": 5.0, "cached_input": 0.5, "output": 25.0}
    return Task(
        name="otel-task",
        goal=GOAL,
        tools=[add],
        executor={"endpoint": "flash", "effort": "low"},
        frontier={"endpoint": "frontier", "effort": "high"},
        escalation={"after_failures": 5, "at": ["replan"]},
        check={"type": "equals", "value": "5", "max_attempts": 2},
        budget={"max_steps": 6, "max_wall_s": 30},
        endpoints={
            "flash": server.endpoint_config("flash", price=flash, api_key_env="OTEL_TEST_KEY"),
            "frontier": server.endpoint_config("frontier", "anthropic", price=front, api_key_env="OTEL_TEST_KEY"),
        },
    )


async def _run(tmp_path: Path, otel) -> None:
    with ScriptedServer({"flash": executor, "frontier": frontier}) as server:
        async with Advisor(runs_dir=tmp_path, otel=otel, fsync=False) as adv:
            result = await adv.run(make_task(server))
    assert result.outcome == "passed" and result.consults == 1


async def test_a_run_with_a_consult_is_one_trace(tmp_path, receiver, monkeypatch):
    monkeypatch.setenv("OTEL_TEST_KEY", SECRET)
    await _run(tmp_path, True)
    spans = receiver.spans()
    by_name = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    (task,) = by_name["advisor.task otel-task"]
    assert task["parent"] is None and task["service"] == "advisor"
    assert len({s["trace"] for s in spans}) == 1
    assert task["attrs"]["advisor.outcome"] == "passed" and task["attrs"]["advisor.consults"] == 1
    steps = sorted(by_name["advisor.step 1"] + by_name["advisor.step 2"] + by_name["advisor.step 3"], key=lambda s: s["start"])
    assert all(s["parent"] == task["id"] for s in steps)
    assert [s["attrs"]["advisor.step"] for s in steps] == [1, 2, 3]
    chats = by_name["chat flash"]
    assert len(chats) == 3 and [c["parent"] for c in sorted(chats, key=lambda c: c["start"])] == [s["id"] for s in steps]
    a = chats[0]["attrs"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.system"] == "openai"
    assert a["gen_ai.request.model"] == "flash"
    assert a["gen_ai.usage.input_tokens"] == 120 and a["gen_ai.usage.output_tokens"] == 8
    assert a["advisor.usage.cached_input_tokens"] == 20 and a["advisor.role"] == "executor"
    assert a["advisor.effort"] == "low"
    assert a["advisor.cost_usd"] == pytest.approx((100 * 0.20 + 20 * 0.04 + 8 * 1.15) / 1e6)
    (tool_span,) = by_name["execute_tool add"]
    assert tool_span["parent"] == steps[0]["id"] and tool_span["attrs"]["gen_ai.tool.name"] == "add"
    assert tool_span["attrs"]["advisor.tool.is_error"] is False
    (consult,) = by_name["advisor.consult replan"]
    assert consult["parent"] == steps[1]["id"]
    assert consult["attrs"]["advisor.consult.trigger"] == "replan" and consult["attrs"]["advisor.consult.mode"] == "advise"
    assert consult["attrs"]["advisor.cost_usd"] == pytest.approx((300 * 5.0 + 40 * 25.0) / 1e6)
    (advice_call,) = by_name["chat frontier"]
    assert advice_call["parent"] == consult["id"]
    assert advice_call["attrs"]["gen_ai.system"] == "anthropic" and advice_call["attrs"]["advisor.role"] == "frontier"
    assert advice_call["attrs"]["advisor.purpose"] == "consult" and advice_call["attrs"]["advisor.effort"] == "high"
    for s in spans:  # children inside their parents
        parent = next((p for p in spans if p["id"] == s["parent"]), None)
        if parent is not None:
            assert parent["start"] <= s["start"] <= s["end"] <= parent["end"]
    # no content unless asked: not the goal, the tool's output, the advice; never the key
    raw = b"".join(receiver.raw)
    assert GOAL.encode() not in raw and b"ADVICE" not in raw and b"gen_ai.tool.call.result" not in raw
    assert SECRET.encode() not in raw


async def test_content_is_exported_only_when_asked_for(tmp_path, receiver, monkeypatch):
    monkeypatch.setenv("OTEL_TEST_KEY", SECRET)
    await _run(tmp_path, {"content": True})
    spans = {s["name"]: s for s in receiver.spans()}
    assert spans["advisor.task otel-task"]["attrs"]["advisor.goal"] == GOAL
    tool_attrs = spans["execute_tool add"]["attrs"]
    assert json.loads(tool_attrs["gen_ai.tool.call.arguments"]) == {"a": 2, "b": 3}
    assert tool_attrs["gen_ai.tool.call.result"] == "5"
    assert spans["advisor.consult replan"]["attrs"]["advisor.consult.advice"] == "ADVICE: the tool said 5."
    assert SECRET.encode() not in b"".join(receiver.raw)


def test_advisor_otel_env_and_the_config_file_turn_it_on_for_the_cli(tmp_path, receiver, monkeypatch, capsys):
    monkeypatch.setenv("OTEL_TEST_KEY", SECRET)
    with ScriptedServer({"flash": executor, "frontier": frontier}) as server:
        data = make_task(server).model_dump(mode="json", exclude={"tools"})
        data["tools"] = []  # a YAML task: no Python tool; the executor's call to add is an unknown tool
        (tmp_path / "t.yaml").write_text(yaml.safe_dump(data))
        (tmp_path / "advisor.yaml").write_text("otel: {content: true}\n")
        monkeypatch.delenv("ADVISOR_OTEL", raising=False)
        main(["run", str(tmp_path / "t.yaml"), "--runs-dir", str(tmp_path / "runs")])
        names = [s["name"] for s in receiver.spans()]
        assert "advisor.task otel-task" in names
        (task,) = [s for s in receiver.spans() if s["name"] == "advisor.task otel-task"]
        assert task["attrs"]["advisor.goal"] == GOAL  # content: true from advisor.yaml
        receiver.requests.clear()
        monkeypatch.setenv("ADVISOR_OTEL", "0")  # off whatever the config says
        main(["run", str(tmp_path / "t.yaml"), "--runs-dir", str(tmp_path / "runs")])
        assert receiver.requests == []
    (tmp_path / "advisor.yaml").write_text("otel: {contents: true}\n")
    monkeypatch.delenv("ADVISOR_OTEL")
    assert main(["run", str(tmp_path / "t.yaml")]) == 2
    assert "otel.contents: Extra inputs are not permitted" in capsys.readouterr().err


def test_nothing_of_opentelemetry_is_loaded_when_off():
    code = (
        "import sys, asyncio\n"
        "from advisor import Advisor\n"
        "import advisor.cli, advisor.evals.cli\n"
        "adv = Advisor(runs_dir='/tmp')\n"
        "assert adv._otel is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "ADVISOR_OTEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
