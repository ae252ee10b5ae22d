"""End to end: `advisor run` and `Advisor.run` against a real scripted server on 127.0.0.1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from advisor import Advisor, Task, tool
from advisor.pricing import Price
from advisor.testing import Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage
from advisor.trace import read_trace

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-SECRET-4242-do-not-leak"
EXEC_USAGE = ScriptedUsage(prompt_tokens=1000, cached_tokens=400, completion_tokens=50, reasoning_tokens=10)
FRONTIER_USAGE = ScriptedUsage(prompt_tokens=2000, completion_tokens=300)
FLASH_PRICE = {"input": 0.20, "cached_input": 0.04, "output": 1.15}
FRONTIER_PRICE = {"input": 5.0, "cached_input": 0.5, "output": 25.0}


def write_task(tmp: Path, server: ScriptedServer, **over) -> Path:
    task = {
        "name": "six-times-seven",
        "goal": "Compute 6*7 with the python tool. Answer with the number only.",
        "tools": ["python"],
        "executor": {"endpoint": "flash", "effort": "low"},
        "frontier": {"endpoint": "frontier", "effort": "high"},
        "escalation": {"after_failures": 2, "at": [], "mode": "advise", "max_consults": 3},
        "budget": {"max_usd": 0.5, "max_steps": 10, "max_wall_s": 60},
        "check": {"type": "equals", "value": "42"},
        "endpoints": {
            "flash": {
                "provider": "openai",
                "base_url": server.base_url,
                "model": "flash",
                "api_key_env": "TEST_FLASH_KEY",
                "price": FLASH_PRICE,
            },
            "frontier": {
                "provider": "anthropic",
                "base_url": server.anthropic_base_url,
                "model": "frontier",
                "price": FRONTIER_PRICE,
                "free": False,
            },
        },
    }
    for k, v in over.items():
        task[k] = v
    path = tmp / "task.yaml"
    path.write_text(yaml.safe_dump(task), encoding="utf-8")
    return path


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TEST_FLASH_KEY"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "advisor.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def executor_script():
    return [
        Reply(tool_calls=[ScriptedToolCall("python", '{"code": "print(6*7"')], usage=EXEC_USAGE),  # malformed
        Reply(tool_calls=[ScriptedToolCall("calculator", {"expr": "6*7"})], usage=EXEC_USAGE),  # unknown tool
        Reply(tool_calls=[ScriptedToolCall("python", {"code": "print(6*7)"})], usage=EXEC_USAGE),
        Reply(text="The product is 42.\nAnswer: 42", usage=EXEC_USAGE),
    ]


def test_cli_fails_twice_gets_advice_then_passes(tmp_path: Path):
    with ScriptedServer(
        {
            "flash": executor_script(),
            "frontier": [Reply(text="Call python with print(6*7).", usage=FRONTIER_USAGE)],
        }
    ) as server:
        task = write_task(tmp_path, server)
        proc = run_cli(
            "run", str(task), "--runs-dir", str(tmp_path / "runs"), env_extra={"TEST_FLASH_KEY": KEY}
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert all(r.auth_is(KEY) for r in server.requests_for("flash"))
        consult_req = server.requests_for("frontier")[0].body
        # the consult saw the failures in its digest
        assert "calculator" in json.dumps(consult_req)
    (result_path,) = (tmp_path / "runs").glob("*/six-times-seven/result.json")
    result = json.loads(result_path.read_text())
    assert result["outcome"] == "passed" and result["answer"] == "42"
    assert result["consults"] == 1 and result["skipped_consults"] == 0 and result["steps"] == 4
    assert result["tokens"]["executor"] == {
        "input": 2400,
        "cached_input": 1600,
        "cache_write": 0,
        "output": 160,
        "reasoning": 40,
    }
    assert result["tokens"]["frontier"] == {
        "input": 2000,
        "cached_input": 0,
        "cache_write": 0,
        "output": 300,
        "reasoning": 0,
    }
    # by hand: executor 4 x (600*0.20 + 400*0.04 + (40+10)*1.15) / 1e6; frontier (2000*5 + 300*25) / 1e6
    assert (
        round(result["cost_usd"]["executor"], 8)
        == round(4 * (600 * 0.20 + 400 * 0.04 + 50 * 1.15) / 1e6, 8)
        == 0.000774
    )
    assert round(result["cost_usd"]["frontier"], 8) == 0.0175
    assert round(result["cost_usd"]["total"], 8) == 0.018274
    assert round(result["cost_usd"]["frontier_only_estimate"], 8) == round(
        (4 * (600 * 5 + 400 * 0.5 + 50 * 25) + 17500) / 1e6, 8
    )
    events = read_trace(result_path.parent / "trace.jsonl")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "task_start" and kinds[-1] == "task_end"
    failed = [e["reason"] for e in events if e["type"] == "step_failed"]
    assert failed == ["malformed_tool_call", "unknown_tool"]
    assert kinds.index("consult") > kinds.index("step_failed")
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert round(sum(e["cost_usd"] for e in events if e["type"] == "model_call"), 10) == round(
        result["cost_usd"]["total"], 10
    )
    text = "".join(p.read_text() for p in result_path.parent.glob("*.*") if p.is_file())
    assert KEY not in text and KEY not in proc.stdout + proc.stderr
    assert "frontier-only" in proc.stdout and "passed" in proc.stdout


def test_consult_skipped_when_it_would_break_the_budget(tmp_path: Path):
    with ScriptedServer({"flash": executor_script(), "frontier": []}) as server:
        # one executor call costs 0.0001935; a consult estimate is far above what is left
        task = write_task(tmp_path, server, budget={"max_usd": 0.001, "max_steps": 10, "max_wall_s": 60})
        proc = run_cli(
            "run", str(task), "--runs-dir", str(tmp_path / "runs"), env_extra={"TEST_FLASH_KEY": KEY}
        )
        assert proc.returncode == 0, proc.stderr
        assert server.requests_for("frontier") == []
    (rp,) = (tmp_path / "runs").glob("*/*/result.json")
    result = json.loads(rp.read_text())
    assert result["consults"] == 0 and result["skipped_consults"] == 1
    skipped = [e for e in read_trace(rp.parent / "trace.jsonl") if e["type"] == "consult_skipped"]
    assert skipped[0]["reason"] == "budget" and skipped[0]["estimated_cost_usd"] > 0.001


def test_budget_never_overrun_by_more_than_one_call(tmp_path: Path):
    def loop_forever(req):
        return Reply(
            tool_calls=[ScriptedToolCall("python", {"code": f"print({len(req['messages'])})"})],
            usage=EXEC_USAGE,
        )

    with ScriptedServer({"flash": loop_forever, "frontier": []}) as server:
        task = write_task(
            tmp_path,
            server,
            budget={"max_usd": 0.0005, "max_steps": 30, "max_wall_s": 60},
            escalation={"after_failures": 2, "at": [], "max_consults": 0},
        )
        proc = run_cli(
            "run", str(task), "--runs-dir", str(tmp_path / "runs"), env_extra={"TEST_FLASH_KEY": KEY}
        )
        assert proc.returncode == 1
        assert "six-times-seven: budget_exceeded: max_usd 0.0005 reached" in proc.stdout
    (rp,) = (tmp_path / "runs").glob("*/*/result.json")
    result = json.loads(rp.read_text())
    assert result["outcome"] == "budget_exceeded"
    assert 0.0005 <= result["cost_usd"]["total"] < 0.0005 + 0.0001935 + 1e-12
    assert result["steps"] == 3


def test_takeover_mode_frontier_acts_then_hands_back(tmp_path: Path):
    with ScriptedServer(
        {
            "flash": executor_script()[:2] + [Reply(text="Answer: 42", usage=EXEC_USAGE)],
            "frontier": [
                Reply(tool_calls=[ScriptedToolCall("python", {"code": "print(6*7)"})], usage=FRONTIER_USAGE)
            ],
        }
    ) as server:
        task = write_task(
            tmp_path, server, escalation={"after_failures": 2, "mode": "takeover", "takeover_steps": 1}
        )
        proc = run_cli(
            "run", str(task), "--runs-dir", str(tmp_path / "runs"), env_extra={"TEST_FLASH_KEY": KEY}
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # the frontier acted with the executor's tools
        assert server.requests_for("frontier")[0].body["tools"][0]["name"] == "python"
    (rp,) = (tmp_path / "runs").glob("*/*/result.json")
    result = json.loads(rp.read_text())
    assert result["consults"] == 1 and result["steps"] == 4
    calls = [e for e in read_trace(rp.parent / "trace.jsonl") if e["type"] == "model_call"]
    assert [(c["role"], c["purpose"]) for c in calls] == [("executor", "step")] * 2 + [
        ("frontier", "takeover"),
        ("executor", "step"),
    ]


def test_final_review_and_replan(tmp_path: Path):
    exec_script = [Reply(text="Answer: 41", usage=EXEC_USAGE), Reply(text="Answer: 42", usage=EXEC_USAGE)]
    front = [
        Reply(text="6*7 is not 41; recompute.", usage=FRONTIER_USAGE),
        Reply(text="APPROVE", usage=FRONTIER_USAGE),
    ]
    with ScriptedServer({"flash": exec_script, "frontier": front}) as server:
        task = write_task(
            tmp_path, server, escalation={"after_failures": 2, "at": ["final"], "max_consults": 3}
        )
        proc = run_cli(
            "run", str(task), "--runs-dir", str(tmp_path / "runs"), env_extra={"TEST_FLASH_KEY": KEY}
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    (rp,) = (tmp_path / "runs").glob("*/*/result.json")
    result = json.loads(rp.read_text())
    # only the first answer is reviewed; the second goes straight to the check
    assert result["outcome"] == "passed" and result["consults"] == 1


async def test_forty_concurrent_tasks_with_a_custom_tool(tmp_path: Path):
    @tool
    def lookup(key: str) -> str:
        """Look a key up.

        Args:
            key: the key
        """
        return {"answer": "42"}.get(key, "missing")

    def script(req):
        if req["messages"][-1]["role"] == "tool":
            return Reply(text=f"Answer: {req['messages'][-1]['content']}", usage=EXEC_USAGE)
        return Reply(tool_calls=[ScriptedToolCall("lookup", {"key": "answer"})], usage=EXEC_USAGE)

    with ScriptedServer({"flash": script}) as server:
        tasks = [
            Task(
                name=f"t{i}",
                goal="Look up 'answer'.",
                tools=[lookup],
                executor={"endpoint": "flash"},
                check={"type": "equals", "value": "42"},
                endpoints={
                    "flash": server.endpoint_config("flash").model_copy(
                        update={"free": False, "price": Price(**FLASH_PRICE)}
                    )
                },
            )
            for i in range(40)
        ]
        async with Advisor(runs_dir=tmp_path, fsync=False) as adv:
            results = await adv.run_many(tasks, concurrency=40)
    assert [r.outcome for r in results] == ["passed"] * 40
    assert all(r.steps == 2 and abs(r.cost_usd["total"] - 2 * 0.0001935) < 1e-12 for r in results)
    assert len(server.requests_for("flash")) == 80


@pytest.mark.parametrize(
    "patch, expect",
    [
        ({"colour": "red"}, "colour: unknown key"),
        ({"inputs": {"images": ["nope.png"]}}, "inputs.images[0]: file not found"),
        ({"budget": {"max_usd": -1}}, "budget.max_usd: Input should be greater than or equal to 0"),
        ({"executor": {"endpoint": "flsh"}}, "executor.endpoint: unknown endpoint 'flsh'"),
        ({"tools": ["python", "hammer"]}, "unknown tool 'hammer'"),
        ({"escalation": {"mode": "panic"}}, "escalation.mode"),
        (  # every problem on the one line, not the first and "(+1 more)"
            {"budget": {"max_usd": -1, "max_steps": 10, "max_wall_s": 60, "max_stepz": 3}},
            "budget.max_usd: Input should be greater than or equal to 0 (got -1); budget.max_stepz: unknown key",
        ),
        (None, "api_key_env: environment variable TEST_FLASH_KEY is not set"),
        (
            {"endpoints": {"flash": {"provider": "openai", "model": "m"}}},
            "endpoints.flash.price: endpoint has no price",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, patch, expect):
    with ScriptedServer({}) as server:
        task = write_task(tmp_path, server, **(patch or {}))
        if patch and "endpoints" in patch:
            data = yaml.safe_load(task.read_text())
            data["endpoints"]["frontier"] = {"provider": "openai", "model": "f", "free": True}
            task.write_text(yaml.safe_dump(data))
        proc = run_cli("run", str(task), env_extra={} if patch is None else {"TEST_FLASH_KEY": KEY})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(task) in lines[0] and expect in lines[0], lines[0]


def test_missing_task_file_and_bad_yaml(tmp_path: Path):
    proc = run_cli("run", str(tmp_path / "none.yaml"))
    assert proc.returncode == 2 and "task file not found" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngoal: [unclosed\n")
    proc = run_cli("run", str(bad))
    assert proc.returncode == 2 and "invalid YAML" in proc.stderr and "line" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_failed_run_says_why_and_claims_no_saving(tmp_path: Path):
    wrong = [Reply(text="Answer: 41", usage=EXEC_USAGE)] * 2
    with ScriptedServer({"flash": wrong, "frontier": []}) as server:
        task = write_task(tmp_path, server, check={"type": "equals", "value": "42", "max_attempts": 2})
        proc = run_cli(
            "run", str(task), "--runs-dir", str(tmp_path / "runs"), "--strategy", "executor",
            env_extra={"TEST_FLASH_KEY": KEY},
        )
    (result_path,) = (tmp_path / "runs").glob("*/six-times-seven/result.json")
    result = json.loads(result_path.read_text())
    assert result["outcome"] == "failed"
    assert result["error"].startswith("the check rejected the answer 2 times")
    assert result["workspace_diff"] is None  # nothing changed: null, as docs/trace-format.md says
    events = read_trace(result_path.parent / "trace.jsonl")
    assert events[0]["type"] == "task_start" and events[0]["run_id"] == result_path.parent.parent.name
    report = (result_path.parent / "report.md").read_text()
    assert "nothing saved" in report and "(saved" not in report
    row = next(line for line in proc.stdout.splitlines() if line.startswith("│ six-times-seven"))
    assert row.rstrip(" │|").endswith("-")


def test_a_terminal_shows_each_step_as_a_line_above_the_live_table(tmp_path: Path):
    import pty
    import re

    with ScriptedServer(
        {
            "flash": executor_script(),
            "frontier": [Reply(text="Call python with print(6*7).", usage=FRONTIER_USAGE)],
        }
    ) as server:
        task = write_task(tmp_path, server)
        leader, follower = pty.openpty()
        env = {**os.environ, "TEST_FLASH_KEY": KEY, "TERM": "xterm-256color", "COLUMNS": "200"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "advisor.cli", "run", str(task), "--runs-dir", str(tmp_path / "runs")],
            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env, cwd=ROOT,
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=120) == 0
        os.close(leader)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert "advisor run" in screen  # the live table was drawn: this was a terminal
    for line in (
        "six-times-seven: step 3 tool python(",
        "six-times-seven: step 4 answer by the executor: 42",
        "six-times-seven: check passed",
        "consult at failures (advise)",
    ):
        assert line in screen
