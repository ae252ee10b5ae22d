"""MCP tool servers through the official SDK: a real registry server (mcp-server-time) over stdio, and the
small MCPServer in data/mcp_server.py (errors, images, a timeout, a crash) over stdio and streamable HTTP."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from advisor import Advisor, Task
from advisor.task import TaskError
from advisor.testing import Reply, ScriptedServer, ScriptedToolCall
from advisor.trace import read_trace

SERVER = str(Path(__file__).parent / "data" / "mcp_server.py")
TIME_SERVER = str(Path(sys.executable).parent / "mcp-server-time")


def make_task(server: ScriptedServer, mcp: dict, **over) -> Task:
    fields = {
        "name": "mcp",
        "goal": "Use the tools.",
        "mcp_servers": mcp,
        "executor": {"endpoint": "flash"},
        "endpoints": {"flash": server.endpoint_config("flash")},
        "budget": {"max_steps": 10, "max_wall_s": 60},
        **over,
    }
    return Task.model_validate(fields)


def call(name: str, args: dict) -> Reply:
    return Reply(tool_calls=[ScriptedToolCall(name, args)])


def last_tool_text(req: dict) -> str:
    return next(m["content"] for m in reversed(req["messages"]) if m["role"] == "tool")


async def test_registry_time_server_end_to_end(tmp_path):
    script = [
        call("get_current_time", {"timezone": "Etc/UTC"}),
        lambda req: Reply(text="Answer: " + json.loads(last_tool_text(req))["datetime"]),
    ]
    with ScriptedServer({"flash": script}) as server:
        task = make_task(
            server,
            {"time": {"command": TIME_SERVER}},
            check={"type": "regex", "value": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$"},
        )
        async with Advisor(runs_dir=tmp_path, fsync=False) as adv:
            result = await adv.run(task)
        tools = {t["function"]["name"]: t["function"] for t in server.requests_for("flash")[0].body["tools"]}
    assert result.outcome == "passed", result.error
    assert set(tools) == {"get_current_time", "convert_time"}
    assert tools["get_current_time"]["parameters"]["required"] == ["timezone"]
    events = read_trace(Path(result.out_dir) / "trace.jsonl")
    mcp = next(e for e in events if e["type"] == "mcp_tools")
    assert mcp["tools"] == {"get_current_time": "time", "convert_time": "time"}
    res = next(e for e in events if e["type"] == "tool_result")
    assert not res["is_error"] and res["data"]["timezone"] == "Etc/UTC"  # structured content kept


async def test_errors_images_timeouts_and_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVISOR_MCP_TEST_VAR", "value-42")
    script = [
        call("fail", {"message": "no such record"}),
        call("add", {"a": "x"}),  # the server's own argument check
        call("swatch", {"color": "blue", "width": 40, "height": 30}),
        call("slow", {"seconds": 30}),
        call("whoami", {}),
        call("crash", {}),
        call("whoami", {}),
        "Answer: done",
    ]
    with ScriptedServer({"flash": script}) as server:
        task = make_task(
            server,
            {
                "t": {
                    "command": sys.executable,
                    "args": [SERVER],
                    "env": ["ADVISOR_MCP_TEST_VAR"],
                    "timeout_s": 1.5,
                }
            },
        )
        async with Advisor(runs_dir=tmp_path, fsync=False) as adv:
            start = time.monotonic()
            result = await adv.run(task)
            took = time.monotonic() - start
        reqs = [r.body for r in server.requests_for("flash")]
    assert result.outcome == "passed" and result.steps == 8, result.error
    assert took < 30  # the slow call was cut at its timeout
    texts = [last_tool_text(r) for r in reqs[1:]]
    assert texts[0].startswith("error: ") and "fail" in texts[0]
    assert texts[1].startswith("error: ") and "validation error" in texts[1]
    assert texts[2] == "[new image img_0: 40x30 px (mcp:t.swatch)]"
    image_msg = reqs[3]["messages"][-1]  # the image follows the tool message in a user message
    assert image_msg["role"] == "user" and any(p.get("type") == "image_url" for p in image_msg["content"])
    assert texts[3] == "error: mcp server 't': slow timed out after 1.5 s"
    assert texts[4].startswith("pid=") and texts[4].endswith("var=value-42")
    assert texts[5].startswith("error: mcp server 't' is not running")
    assert texts[6] == texts[5]  # later calls fail at once
    trace = (Path(result.out_dir) / "trace.jsonl").read_text()
    start_event = read_trace(Path(result.out_dir) / "trace.jsonl")[1]
    assert start_event["type"] == "mcp_tools" and start_event["servers"]["t"]["env"] == [
        "ADVISOR_MCP_TEST_VAR"
    ]
    assert trace.count("value-42") == trace.count("var=value-42")  # only where the tool itself printed it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_server(monkeypatch):
    port = _free_port()
    env = {**os.environ, "ADVISOR_MCP_TOKEN": "tok-secret-9"}
    proc = subprocess.Popen([sys.executable, SERVER, "http", str(port)], env=env)
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


async def test_streamable_http_with_a_header_from_env(tmp_path, http_server, monkeypatch):
    monkeypatch.setenv("MY_MCP_TOKEN", "tok-secret-9")
    script = [call("add", {"a": 20, "b": 22}), lambda req: Reply(text="Answer: " + last_tool_text(req))]
    with ScriptedServer({"flash": script}) as server:
        task = make_task(
            server,
            {"calc": {"url": http_server, "headers_env": {"X-Test-Token": "MY_MCP_TOKEN"}}},
            check={"type": "equals", "value": "42"},
        )
        async with Advisor(runs_dir=tmp_path, fsync=False) as adv:
            result = await adv.run(task)
    assert result.outcome == "passed", result.error
    assert "tok-secret-9" not in (Path(result.out_dir) / "trace.jsonl").read_text()
    monkeypatch.delenv("MY_MCP_TOKEN")
    with ScriptedServer({}) as server:
        task = make_task(
            server, {"calc": {"url": http_server, "headers_env": {"X-Test-Token": "MY_MCP_TOKEN"}}}
        )
        with pytest.raises(TaskError) as e:
            task.validate_ready()
    assert "mcp_servers.calc: environment variable MY_MCP_TOKEN is not set" in str(e.value)


async def test_one_server_shared_by_concurrent_tasks_and_stopped(tmp_path):
    script = lambda req: (  # noqa: E731
        Reply(text="Answer: " + last_tool_text(req))
        if any(m["role"] == "tool" for m in req["messages"])
        else call("whoami", {})
    )
    with ScriptedServer({"flash": script}) as server:
        tasks = [
            make_task(server, {"t": {"command": sys.executable, "args": [SERVER]}}, name=f"t{i}")
            for i in range(3)
        ]
        async with Advisor(runs_dir=tmp_path, fsync=False) as adv:
            results = await adv.run_many(tasks)
    assert all(r.outcome == "passed" for r in results), [r.error for r in results]
    pids = {r.answer.split()[0] for r in results}
    assert len(pids) == 1  # one server process for the three tasks
    pid = int(pids.pop().removeprefix("pid="))
    assert not _running(pid)  # stopped when the Advisor closed


def _running(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state == "Z":
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"command": "/nonexistent/mcp-server"}, "mcp server 'bad' failed to start: "),
        (
            {"command": "sleep", "args": ["60"], "startup_timeout_s": 1},
            "mcp server 'bad' did not start within 1 s",
        ),
        (
            {
                "command": sys.executable,
                "args": ["-c", "import sys; print('no config file', file=sys.stderr); sys.exit(2)"],
            },
            "(stderr: no config file)",
        ),
    ],
)
async def test_a_server_that_cannot_start_is_a_one_line_task_error(tmp_path, config, expected):
    with ScriptedServer({"flash": ["Answer: x"]}) as server:
        task = make_task(server, {"bad": config})
        async with Advisor(runs_dir=tmp_path, fsync=False) as adv:
            start = time.monotonic()
            result = await adv.run(task)
        assert server.requests == []  # before any model call
    assert result.outcome == "error" and expected in result.error and "\n" not in result.error
    assert time.monotonic() - start < 20


@pytest.fixture
def one_commit_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@e",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@e",
    }
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "fix the parser's off-by-one"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env={**os.environ, **env})
    return repo


async def test_registry_git_server_on_a_temporary_repository(tmp_path, one_commit_repo):
    repo = one_commit_repo
    script = [
        call("git_status", {"repo_path": str(tmp_path)}),  # outside the server's repository: refused
        call("git_log", {"repo_path": str(repo), "max_count": 1}),
        lambda req: Reply(text="Answer: " + last_tool_text(req).split("Message: ")[1].strip()),
    ]
    git_server = str(Path(sys.executable).parent / "mcp-server-git")
    with ScriptedServer({"flash": script}) as server:
        task = make_task(
            server,
            {
                "git": {
                    "command": git_server,
                    "args": ["--repository", str(repo)],
                    "tools": ["git_log", "git_status"],
                }
            },
            check={"type": "equals", "value": "fix the parser's off-by-one"},
        )
        async with Advisor(runs_dir=tmp_path / "runs", fsync=False) as adv:
            result = await adv.run(task)
        tools = [t["function"]["name"] for t in server.requests_for("flash")[0].body["tools"]]
        first_result = last_tool_text(server.requests_for("flash")[1].body)
    assert result.outcome == "passed", result.error
    assert tools == ["git_status", "git_log"]  # only the tools the task names
    assert first_result.startswith("error: ") and "outside the allowed repository" in first_result
