"""The shell tool and its sandboxes: confinement, limits, runaway commands, structured results."""

import asyncio
import glob
import os
import shutil
from pathlib import Path

import pytest
from advisor.tools.commands import (
    Limits,
    SandboxUnavailable,
    bwrap_problem,
    require_sandbox,
    run_command,
)
from advisor.tools.confine import cgroups_writable
from advisor.tools.registry import BUILTIN
from advisor.tools.shell import ShellSettings
from advisor.tools.spec import ToolContext

from tests.security.conftest import open_workspace

SHELL = BUILTIN["shell"]
BWRAP = bwrap_problem()
MODES = [
    pytest.param("bwrap", marks=pytest.mark.skipif(BWRAP is not None, reason=BWRAP or "")),
    "limits",
]
HAVE_CGROUPS = cgroups_writable()


@pytest.fixture(params=MODES)
def sandbox(request):
    return request.param


@pytest.fixture
def ws():
    with open_workspace() as root:  # limits as root runs the command as a uid that must reach it
        yield root


def ctx_for(ws, sandbox, **limits):
    return ToolContext(workspace=ws, extra={"shell": ShellSettings(sandbox=sandbox, limits=Limits(**limits))})


def _alive(marker: str) -> int:
    n = 0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                n += marker.encode() in (p / "cmdline").read_bytes()
            except OSError:
                pass
    return n


async def test_exit_code_stdout_stderr_separated(ws, sandbox):
    r = await SHELL.invoke({"command": "echo out; echo err >&2; pwd; exit 3"}, ctx_for(ws, sandbox))
    assert r.is_error
    assert r.data["exit_code"] == 3 and r.data["sandbox"] == sandbox and not r.data["timed_out"]
    out, err = r.text.split("[stderr]")
    assert out.splitlines()[:2] == ["out", str(ws.resolve())]
    assert err.splitlines()[1] == "err" and "[exit code 3]" in err
    ok = await SHELL.invoke({"command": "printf 'a\\nb\\n' > f.txt && wc -l < f.txt"}, ctx_for(ws, sandbox))
    assert not ok.is_error and ok.text.startswith("2\n") and (ws / "f.txt").read_text() == "a\nb\n"


async def test_secrets_do_not_reach_the_command(ws, sandbox, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    r = await SHELL.invoke({"command": "env; echo HOME=$HOME"}, ctx_for(ws, sandbox))
    assert "sk-secret-123" not in r.text and f"HOME={ws.resolve()}" in r.text


@pytest.mark.skipif(BWRAP is not None, reason=BWRAP or "")
async def test_bwrap_confines_files_and_network(ws, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    cmd = (
        f"echo x > {outside} ; echo y > /usr/advisor-probe ; cat {outside} ; touch inside.txt ; "
        "python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 53), timeout=2)' ; "
        "ls /proc | grep -c '^[0-9]'"
    )
    r = await SHELL.invoke({"command": cmd}, ctx_for(ws, "bwrap"))
    assert outside.read_text() == "keep" and "advisor-probe" not in os.listdir("/usr")
    assert "Read-only file system" in r.text and (ws / "inside.txt").exists()
    assert "Network is unreachable" in r.text
    assert int(r.text.split("[stderr]")[0].split()[-1]) < 10  # its own PID namespace
    net = await SHELL.invoke(
        {"command": "python3 -c 'import socket; print(len(socket.getaddrinfo(\"localhost\", 80)) > 0)'"},
        ctx_for(ws, "bwrap", network=True),
    )
    assert net.text.startswith("True")


async def test_timeout_kills_background_children(ws, sandbox):
    marker = "777.25"  # an unusual sleep length to find the processes by
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    t = asyncio.create_task(ticker())
    r = await SHELL.invoke(
        {"command": f"sleep {marker} & sleep {marker} & sleep {marker}", "timeout_s": 1}, ctx_for(ws, sandbox)
    )
    t.cancel()
    assert r.is_error and r.data["timed_out"] and r.data["exit_code"] is None
    assert "[killed: timed out after 1 s]" in r.text
    assert ticks >= 10  # the event loop ran on while the command slept
    await asyncio.sleep(0.2)
    assert _alive(marker) == 0


async def test_infinite_output_is_bounded(ws, sandbox):
    r = await SHELL.invoke(
        {"command": "yes advisor", "timeout_s": 20},
        ctx_for(ws, sandbox, max_output_bytes=4 * 1024 * 1024, max_output_chars=2000),
    )
    assert r.is_error and r.data["killed"] == "output_limit" and r.data["stdout_omitted_chars"] > 4_000_000
    assert r.data["wall_s"] < 10
    assert len(r.text) < 3000 and "characters omitted" in r.text and r.text.startswith("advisor\n")
    big = await SHELL.invoke(
        {"command": "seq 1 100000"}, ctx_for(ws, sandbox, max_output_chars=600)
    )  # head and tail kept
    assert not big.is_error and big.text.startswith("1\n2\n") and "100000" in big.text
    assert big.data["stdout_omitted_chars"] > 500_000


@pytest.mark.skipif(not HAVE_CGROUPS, reason="no writable pids cgroup here: a fork bomb would not be bounded")
async def test_fork_bomb_is_bounded(ws, sandbox):
    r = await SHELL.invoke(
        {"command": ":(){ :|:& };: ; sleep 2", "timeout_s": 4}, ctx_for(ws, sandbox, max_processes=64)
    )
    assert "fork" in r.text and "Resource temporarily unavailable" in r.text
    await asyncio.sleep(0.3)
    assert not glob.glob(f"/sys/fs/cgroup/pids/advisor/cmd-{os.getpid()}-*")  # cleaned up
    after = await SHELL.invoke({"command": "echo alive"}, ctx_for(ws, sandbox))
    assert after.text.startswith("alive")


async def test_fork_loop_without_cgroups_is_killed(ws, sandbox, monkeypatch):
    monkeypatch.setenv("ADVISOR_NO_CGROUPS", "1")
    marker = "555.75"
    r = await SHELL.invoke(
        {"command": f"while true; do sleep {marker} & done", "timeout_s": 1.5},
        ctx_for(ws, sandbox, max_processes=200),
    )
    assert r.data["timed_out"]
    await asyncio.sleep(0.2)
    assert _alive(marker) == 0


async def test_memory_limit(ws, sandbox):
    r = await SHELL.invoke(
        {"command": "python3 -c 'x = bytearray(700 * 1024 * 1024); print(len(x))'"},
        ctx_for(ws, sandbox, memory_mb=200),
    )
    assert r.is_error and "700" not in r.text.split("[")[0]
    assert "memory limit 200 MB" in r.text or "MemoryError" in r.text


async def test_cancelling_the_call_kills_the_command(ws, sandbox):
    marker = "666.5"
    task = asyncio.create_task(
        run_command(f"sleep {marker}", ws, sandbox=sandbox, limits=Limits(timeout_s=60))
    )
    await asyncio.sleep(0.5)
    assert _alive(marker) >= 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    assert _alive(marker) == 0


async def test_bad_arguments_and_missing_sandbox(ws, monkeypatch):
    ctx = ctx_for(ws, "limits")
    assert (await SHELL.invoke({"command": "  "}, ctx)).text == "error: command is empty"
    assert "timeout_s must be positive" in (await SHELL.invoke({"command": "ls", "timeout_s": 0}, ctx)).text
    monkeypatch.setattr(shutil, "which", lambda name: None)
    bwrap_problem.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable) as e:
            require_sandbox("bwrap")
        msg = str(e.value)
        assert "\n" not in msg and "not installed" in msg and "sandbox: limits" in msg
        r = await SHELL.invoke({"command": "ls"}, ctx_for(ws, "bwrap"))
        assert r.is_error and "sandbox: limits" in r.text
    finally:
        bwrap_problem.cache_clear()


def test_schema_and_registry():
    assert set(SHELL.parameters["properties"]) == {"command", "timeout_s"}
    assert SHELL.parameters["required"] == ["command"]


def test_an_interpreter_under_tmp_is_bound_over_the_fresh_tmpfs(tmp_path, monkeypatch):
    # a venv made in a temporary folder (CI's wheel check, throwaway set-ups): the sandbox's /tmp is a fresh
    # tmpfs, so the venv is bound read-only on top of it, after it, or the python tool cannot start
    from advisor.tools import confine

    venv = Path("/tmp") / f"advisor-test-venv-{os.getpid()}"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    try:
        monkeypatch.setattr(confine, "_interpreter_dirs", lambda: [str(venv), str(venv / "bin")])
        argv = confine.bwrap_argv(tmp_path / "ws", tmp_path / "scratch", network=False, seccomp_fd=3)
        binds = [i for i in range(len(argv) - 2) if argv[i : i + 3] == ["--ro-bind", str(venv), str(venv)]]
        tmpfs = max(i for i in range(len(argv) - 1) if argv[i : i + 2] == ["--tmpfs", "/tmp"])
        assert len(binds) == 1 and binds[0] > tmpfs
        assert ["--ro-bind", "/tmp", "/tmp"] not in [argv[i : i + 3] for i in range(len(argv) - 2)]
    finally:
        shutil.rmtree(venv, ignore_errors=True)
