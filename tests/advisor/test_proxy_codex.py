"""Codex CLI (`@openai/codex`, installed by .ci/run with npm) run headless (`codex exec`) against the
proxy, which it reaches over the OpenAI Responses API, with ScriptedServer upstreams: a plain prompt
answered by the executor; and an executor whose shell commands fail twice (Codex really runs them, in a
temporary folder), after which the frontier is consulted and Codex finishes the task."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from advisor.testing import Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage
from tests.advisor.proxy_helpers import make_config, proxy_for

VERSION = "0.171.0"  # the release .ci/run installs


def codex() -> str | None:
    """Codex's CLI: $ADVISOR_CODEX, the copy .ci/run installs, or `codex` on PATH."""
    for candidate in (
        os.environ.get("ADVISOR_CODEX"),
        str(Path(__file__).resolve().parents[2] / ".ci" / "codex" / "node_modules" / ".bin" / "codex"),
        shutil.which("codex"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


pytestmark = pytest.mark.skipif(
    codex() is None, reason="Codex CLI is not installed (.ci/run installs it with npm)"
)


@pytest.fixture
def upstream():
    with ScriptedServer() as server:
        yield server


def run_codex(proxy, tmp_path: Path, prompt: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`codex exec` pointed at the proxy as docs/proxy.md says, in a fresh home and work folder."""
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    provider = (
        f'model_providers.advisor={{name="advisor", base_url="{proxy.base_url}", '
        'wire_api="responses", env_key="ADVISOR_PROXY_KEY"}'
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "CODEX_HOME": str(home),
        "ADVISOR_PROXY_KEY": "unused",
    }
    cmd = [
        codex(),
        "exec",
        "--skip-git-repo-check",
        "--ephemeral",
        "--ignore-user-config",
        "--color",
        "never",
        # the commands are the test's own script, run in its temporary folder
        "--dangerously-bypass-approvals-and-sandbox",
        "-c",
        "model_provider=advisor",
        "-c",
        provider,
        "-m",
        "advisor",
        "-C",
        str(work),
        prompt,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    return proc, work


def test_codex_exec_plain_prompt_answered_by_the_executor(upstream, tmp_path):
    upstream.script("flash", lambda body: Reply(text="Hello from the executor.", usage=ScriptedUsage(900, 6)))
    with proxy_for(make_config(upstream, tmp_path, frontier_provider="openai")) as proxy:
        proc, _ = run_codex(proxy, tmp_path, "say hi")
        sessions = dict(proxy.router.store.sessions)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Hello from the executor." in proc.stdout
    # Codex's session: its prompt_cache_key; every call the executor's
    (session,) = sessions.values()
    assert [c.role for c in session.ledger.calls] == ["executor"] * len(session.ledger.calls)
    first = upstream.requests_for("flash")[0].body
    assert first["messages"][0]["role"] == "system" and "Codex" in first["messages"][0]["content"]
    assert first["messages"][-1] == {"role": "user", "content": "say hi"} or "say hi" in json.dumps(
        first["messages"][-1]
    )
    assert any(t["function"]["name"] == "exec_command" for t in first["tools"])


def _tool_results(body: dict) -> list[str]:
    return [json.dumps(m.get("content")) for m in body["messages"] if m["role"] == "tool"]


def executor(body: dict) -> Reply:
    """Two shell commands that fail, then (with the frontier's advice in the conversation) one that
    works, then the answer."""
    done = _tool_results(body)
    usage = ScriptedUsage(1000 + 100 * len(done), 20)
    if len(done) == 0:
        return Reply(tool_calls=[ScriptedToolCall("exec_command", {"cmd": "cat notes.txt"})], usage=usage)
    if len(done) == 1:
        return Reply(tool_calls=[ScriptedToolCall("exec_command", {"cmd": "cat ./notes.txt"})], usage=usage)
    if len(done) == 2:
        advised = "create notes.txt" in json.dumps(body["messages"])
        cmd = "echo advised > notes.txt && cat notes.txt" if advised else "echo unadvised"
        return Reply(tool_calls=[ScriptedToolCall("exec_command", {"cmd": cmd})], usage=usage)
    return Reply(text="notes.txt now exists.", usage=usage)


def test_codex_exec_failing_commands_then_the_frontier_is_consulted(upstream, tmp_path):
    upstream.script("flash", executor)
    upstream.script(
        "big", [Reply(text="The file is missing: create notes.txt first.", usage=ScriptedUsage(3000, 40))]
    )
    cfg = make_config(upstream, tmp_path, frontier_provider="openai", escalation={"after_failures": 2})
    with proxy_for(cfg) as proxy:
        proc, work = run_codex(proxy, tmp_path, "show me notes.txt")
        sessions = dict(proxy.router.store.sessions)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "notes.txt now exists." in proc.stdout
    assert (work / "notes.txt").read_text().strip() == "advised"  # Codex ran the advised command
    (session,) = sessions.values()
    assert [(c.trigger, c.kind) for c in session.consults] == [("failures", "advice")]
    roles = [c.role for c in session.ledger.calls]
    assert roles == ["executor", "executor", "frontier", "executor", "executor"]
    assert session.ledger.cost("frontier") > 0
    results = _tool_results(upstream.requests_for("flash")[2].body)
    assert "No such file or directory" in results[0] and "No such file or directory" in results[1]
