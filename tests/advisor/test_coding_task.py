"""Coding tasks end to end: a workspace from a folder or a git revision, shell and edit tools, a command
check whose output goes back to the executor, and the final diff in result.json and report.md."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from advisor.tools.commands import bwrap_problem

from advisor import Advisor, Task
from advisor.task import TaskError, load_task
from advisor.testing import Reply, ScriptedServer, ScriptedToolCall
from advisor.trace import read_trace

SANDBOX = "bwrap" if bwrap_problem() is None else "limits"
BUGGY = "def add(a, b):\n    return a - b\n"
TEST = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


def make_project(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "calc.py").write_text(BUGGY)
    (root / "test_calc.py").write_text(TEST)
    return root


def git(repo: Path, *args: str) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@e",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@e",
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def task_yaml(tmp: Path, server: ScriptedServer, workspace: dict, **over) -> Path:
    task = {
        "name": "fix-add",
        "goal": "Make the tests pass. Answer DONE when they do.",
        "tools": ["shell", "view_file", "edit_file"],
        "workspace": workspace,
        "shell": {"sandbox": SANDBOX},
        "executor": {"endpoint": "flash"},
        "frontier": {"endpoint": "frontier"},
        "escalation": {"after_failures": 1, "max_consults": 2},
        "check": {"type": "command", "run": "python -m pytest -q -p no:cacheprovider", "timeout_s": 120},
        "endpoints": {
            "flash": server.endpoint_config("flash").model_dump(exclude_none=True),
            "frontier": server.endpoint_config("frontier").model_dump(exclude_none=True),
        },
        **over,
    }
    path = tmp / "task.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


FIX = {"path": "calc.py", "old_text": "return a - b", "new_text": "return a + b"}


def script():
    return [
        Reply(tool_calls=[ScriptedToolCall("shell", {"command": "python -m pytest -q -p no:cacheprovider"})]),
        Reply(text="Answer: DONE"),  # the check runs the tests: red, its output comes back
        Reply(tool_calls=[ScriptedToolCall("edit_file", FIX)]),
        Reply(text="Answer: DONE"),  # green
    ]


async def test_folder_workspace_red_consult_green(tmp_path):
    src = make_project(tmp_path / "project")
    with ScriptedServer(
        {"flash": script(), "frontier": ["Run the tests first.", "The function subtracts; make it add."]}
    ) as server:
        task = load_task(task_yaml(tmp_path, server, {"from": "project"}), check_env=False)
        async with Advisor(runs_dir=tmp_path / "runs", fsync=False) as adv:
            result = await adv.run(task)
        executor_requests = server.requests_for("flash")
    assert result.outcome == "passed", result.error
    assert result.steps == 4 and result.consults == 2  # the red pytest run and the failed check
    assert (src / "calc.py").read_text() == BUGGY  # the original is never touched
    out = Path(result.out_dir)
    assert (out / "workspace" / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    diff = json.loads((out / "result.json").read_text())["workspace_diff"]
    assert diff == (
        "--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n+    return a + b\n"
    )
    assert (
        "## Workspace changes" in (out / "report.md").read_text()
        and "+    return a + b" in (out / "report.md").read_text()
    )
    # the failing check's pytest output went back to the executor
    after_check = json.dumps(executor_requests[2].body["messages"][-2:])
    assert "The check failed" in after_check and "assert -1 == 5" in after_check
    events = read_trace(out / "trace.jsonl")
    shell_result = next(e for e in events if e["type"] == "tool_result" and e["name"] == "shell")
    assert shell_result["is_error"] and shell_result["data"]["exit_code"] == 1
    assert shell_result["data"]["sandbox"] == SANDBOX and shell_result["data"]["stdout_omitted_chars"] == 0
    edit = next(e for e in events if e["type"] == "tool_result" and e["name"] == "edit_file")
    assert edit["data"] == {
        "path": "calc.py",
        "kind": "replace",
        "line": 2,
        "removed_lines": 1,
        "added_lines": 1,
    }
    checks = [e for e in events if e["type"] == "check"]
    assert [c["passed"] for c in checks] == [False, True] and checks[0]["check_type"] == "command"
    failed = [e["reason"] for e in events if e["type"] == "step_failed"]
    assert failed == ["nonzero_exit", "check_rejected"]


async def test_git_workspace_at_a_revision(tmp_path):
    repo = make_project(tmp_path / "repo")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "buggy")
    first = git(repo, "rev-parse", "HEAD")
    (repo / "calc.py").write_text("def add(a, b):\n    return b + a\n")
    git(repo, "commit", "-qam", "fixed")
    (repo / "untracked.txt").write_text("dirty")
    with ScriptedServer({"flash": script()[2:], "frontier": []}) as server:
        task = load_task(task_yaml(tmp_path, server, {"git": f"repo@{first[:10]}"}), check_env=False)
        async with Advisor(runs_dir=tmp_path / "runs", fsync=False) as adv:
            result = await adv.run(task)
    assert result.outcome == "passed", result.error
    ws = Path(result.out_dir) / "workspace"
    assert git(ws, "rev-parse", "HEAD") == first and not (ws / "untracked.txt").exists()
    assert git(repo, "status", "--porcelain") == "?? untracked.txt"  # the original: as it was
    assert (repo / "calc.py").read_text() == "def add(a, b):\n    return b + a\n"
    assert git(ws, "diff").endswith("-    return a - b\n+    return a + b")
    assert ".git/" not in result.workspace_diff and result.workspace_diff.startswith("--- a/calc.py")


def test_bad_workspace_and_check_are_one_line_errors(tmp_path):
    make_project(tmp_path / "project")
    (tmp_path / "plain").mkdir()
    with ScriptedServer({}) as server:
        cases = [
            ({"from": "nope"}, {}, "workspace.from: folder not found"),
            ({"git": "plain@main"}, {}, "workspace.git: "),
            ({"from": "project", "git": "x"}, {}, "exactly one of"),
            ({"from": "project"}, {"check": {"type": "command"}}, "check.run: a command check needs `run:`"),
        ]
        for ws, over, expected in cases:
            with pytest.raises(TaskError) as e:
                load_task(task_yaml(tmp_path, server, ws, **over), check_env=False)
            assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_missing_bwrap_stops_the_task_before_any_call(tmp_path, monkeypatch):
    import advisor.tools.confine as confine
    make_project(tmp_path / "project")
    monkeypatch.setattr(confine, "bwrap_problem", lambda: "bwrap (bubblewrap) is not installed")
    with ScriptedServer({"flash": script()}) as server:
        path = task_yaml(tmp_path, server, {"from": "project"}, shell={"sandbox": "bwrap"})
        with pytest.raises(TaskError) as e:
            load_task(path, check_env=False)
        assert server.requests == []
    msg = str(e.value)
    assert "shell.sandbox" in msg and "not installed" in msg and "sandbox: limits" in msg and "\n" not in msg
    Task.model_validate(yaml.safe_load(path.read_text()) | {"shell": {"sandbox": "limits"}})


PYTEST = {"command": "python -m pytest -q -p no:cacheprovider"}


@pytest.mark.parametrize(
    "signals, expect_consults, expect_failed",
    [
        (None, 1, ["nonzero_exit", "repeated_call"]),  # the red run, then the same run with nothing changed
        (["tool_error", "check_failed"], 0, []),  # red runs are not failed steps here
    ],
)
async def test_failure_signals_from_tools(tmp_path, signals, expect_consults, expect_failed):
    make_project(tmp_path / "project")
    script = [
        Reply(tool_calls=[ScriptedToolCall("shell", PYTEST)]),  # red
        Reply(tool_calls=[ScriptedToolCall("shell", PYTEST)]),  # the same failing call, nothing changed
        Reply(tool_calls=[ScriptedToolCall("edit_file", FIX)]),
        Reply(tool_calls=[ScriptedToolCall("shell", PYTEST)]),  # after the edit the same run is progress
        Reply(text="Answer: DONE"),
    ]
    escalation = {"after_failures": 2, "max_consults": 2}
    if signals is not None:
        escalation["failure_signals"] = signals
    with ScriptedServer(
        {"flash": script, "frontier": ["Edit calc.py before running the tests again."]}
    ) as server:
        path = task_yaml(tmp_path, server, {"from": "project"}, escalation=escalation)
        async with Advisor(runs_dir=tmp_path / "runs", fsync=False) as adv:
            result = await adv.run(load_task(path, check_env=False))
    assert result.outcome == "passed", result.error
    assert result.consults == expect_consults
    events = read_trace(Path(result.out_dir) / "trace.jsonl")
    assert [e["reason"] for e in events if e["type"] == "step_failed"] == expect_failed
    shells = [e for e in events if e["type"] == "tool_result" and e["name"] == "shell"]
    assert [s["data"]["exit_code"] if s["data"] else None for s in shells] == [1, None, 0]
    assert "already made and failed" in shells[1]["text"]
