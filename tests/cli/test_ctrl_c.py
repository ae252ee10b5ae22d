"""Ctrl-C (SIGINT) on real `advisor` processes: one line saying what finished, where it is and the command
that resumes, exit code 130, no traceback; a second Ctrl-C ends the process at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from advisor.testing import Reply, ScriptedServer, ScriptedUsage

ROOT = Path(__file__).resolve().parents[2]
PRICE = {"input": 0.20, "cached_input": 0.04, "output": 1.15}
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _slow(seconds: float):
    usage = ScriptedUsage(prompt_tokens=100, completion_tokens=10)
    return lambda body: Reply(text="Answer: 7", usage=usage, delay_s=seconds)


def _task(name: str, server: ScriptedServer) -> dict:
    ep = {
        "provider": "openai",
        "base_url": server.base_url,
        "model": "flash",
        "price": PRICE,
        "max_retries": 0,
    }
    return {
        "name": name,
        "goal": f"Task {name}: give the number.",
        "executor": {"endpoint": "flash"},
        "check": {"type": "equals", "value": "7"},
        "budget": {"max_steps": 3, "max_wall_s": 60},
        "endpoints": {"flash": ep},
    }


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "advisor.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def _wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.05)


def test_ctrl_c_during_eval_is_one_line_and_the_same_command_resumes(tmp_path):
    with ScriptedServer({"flash": _slow(0.6)}) as server:
        suite = tmp_path / "suite"
        suite.mkdir()
        for i in range(6):
            (suite / f"t{i}.yaml").write_text(yaml.safe_dump(_task(f"t{i}", server)))
        out = tmp_path / "out"
        args = ["eval", str(suite), "--strategies", "executor", "--concurrency", "1", "--out", str(out)]
        proc = _start(args, tmp_path)
        _wait_for(lambda: len(list(out.glob("executor/*/result.json"))) >= 2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr + stdout and "CancelledError" not in stderr + stdout
        (line,) = stderr.strip().splitlines()
        finished = len(list(out.glob("executor/*/result.json")))
        assert 2 <= finished < 6
        assert line == (
            f"interrupted: {finished} of 6 task runs finished, kept in {out}; "
            f"resume with: advisor {' '.join(args)}"
        )
        again = _start(args, tmp_path)
        stdout, stderr = again.communicate(timeout=60)
        assert again.returncode == 0, stderr
        assert f"ran {6 - finished} task runs, skipped {finished} already finished" in stdout
        assert len(list(out.glob("executor/*/result.json"))) == 6


def test_ctrl_c_during_run_says_where_the_outputs_are(tmp_path):
    with ScriptedServer({"flash": _slow(30.0)}) as server:
        (tmp_path / "t.yaml").write_text(yaml.safe_dump(_task("slow", server)))
        args = ["run", "t.yaml", "--runs-dir", "runs"]
        proc = _start(args, tmp_path)
        _wait_for(lambda: len(server.requests) >= 1)  # the model call is in flight
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr + stdout
    (line,) = stderr.strip().splitlines()
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert line == (
        f"interrupted: 0 of 1 tasks finished, outputs in runs/{run_dir.name}; "
        "run the rest again with: advisor run t.yaml --runs-dir runs"
    )
    assert (run_dir / "slow" / "trace.jsonl").is_file()  # what happened so far is kept


def test_a_second_ctrl_c_ends_a_slow_cleanup_at_once(tmp_path):
    script = tmp_path / "slow_cleanup.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, sys, time
            from advisor import interrupt

            async def main():
                try:
                    print("running", flush=True)
                    await asyncio.sleep(60)
                finally:
                    print("cleaning up", flush=True)
                    time.sleep(60)  # a cleanup that blocks (a worker finishing its batch)

            try:
                interrupt.run(main())
            except interrupt.Interrupted:
                print("interrupted", flush=True)
            sys.exit(3)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "running"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "cleaning up"
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
    assert proc.returncode == 130
    assert time.monotonic() - start < 5
    assert "Traceback" not in proc.stderr.read()


def test_a_busy_worker_thread_is_not_waited_for(tmp_path):
    # the embedded engine loads and generates in worker threads, which cancellation cannot stop
    script = tmp_path / "busy_thread.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, time
            from advisor import interrupt

            async def main():
                print("loading", flush=True)
                await asyncio.to_thread(time.sleep, 60)

            try:
                interrupt.run(main())
            except interrupt.Interrupted:
                print("interrupted: one line", flush=True)
                interrupt.leave()
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "loading"
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=20)
    assert proc.returncode == 130 and time.monotonic() - start < 10
    assert proc.stdout.read().strip() == "interrupted: one line"
    assert proc.stderr.read() == ""
