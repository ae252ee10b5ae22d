"""Run model-written Python in a subprocess: in the workspace, time- and memory-limited, no secrets.

The child is this interpreter (`sys.executable`, so pillow, numpy and opencv are there) started in
its own session; on timeout the whole process group is killed, children included. Limits are
rlimits set by a small launcher inside the child (not `preexec_fn`, which is unsafe in threaded
parents). This is resource isolation, not a security boundary: the code can still read files the
user can read and open network connections; run untrusted tasks in a container.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools.spec import ToolContext, ToolError, ToolResult, tool
from tools.workspace import workspace_of

DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 300.0
DEFAULT_MEMORY_MB = 2048
DEFAULT_MAX_OUTPUT = 12_000  # characters of output the model sees
MAX_FILE_BYTES = 256 * 1024 * 1024
# Only these variables reach the child; everything else (API keys, tokens, proxies) stays behind.
ENV_ALLOW = ("PATH", "LANG", "LC_ALL", "TZ", "SYSTEMROOT")

_LAUNCHER = r"""
import resource, sys
mem, cpu, fsize = (int(v) for v in sys.argv[1:4])
if mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
path = sys.argv[4]
sys.argv = [path]
sys.path.insert(0, "")
with open(path, encoding="utf-8") as f:
    source = f.read()
code = compile(source, "<python>", "exec")
del mem, cpu, fsize, f, source, resource
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class RunResult:
    output: str  # stdout and stderr interleaved, truncated
    exit_code: int | None  # None when killed on timeout
    timed_out: bool
    wall_s: float
    truncated_chars: int


def child_env(workspace: Path, tmp: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_ALLOW if k in os.environ}
    env.setdefault("PATH", "/usr/bin:/bin")
    env.update(
        HOME=str(workspace),
        TMPDIR=str(tmp),
        PYTHONIOENCODING="utf-8",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        MPLBACKEND="Agg",
        MPLCONFIGDIR=str(tmp / "mpl"),
        # One thread each: BLAS pools reserve address space per thread and would trip the memory cap.
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    env.setdefault("LANG", "C.UTF-8")
    return env


def run_python(
    code: str,
    workspace: Path,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> RunResult:
    """Run `code` with `workspace` as the working directory under the given limits."""
    workspace = Path(workspace).resolve()
    with tempfile.TemporaryDirectory(prefix="advisor-py-") as tmpdir:
        tmp = Path(tmpdir)
        script = tmp / "cell.py"
        script.write_text(code, encoding="utf-8")
        out_path = tmp / "output.txt"
        args = [
            sys.executable,
            "-E",
            "-s",
            "-c",
            _LAUNCHER,
            str(memory_mb * 1024 * 1024 if memory_mb > 0 else 0),
            str(int(timeout_s) + 2),
            str(MAX_FILE_BYTES),
            str(script),
        ]
        start = time.monotonic()
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                args,
                cwd=workspace,
                env=child_env(workspace, tmp),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so we can kill its children too
                close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also reaps stray background children after a normal exit
                proc.wait()
        wall = time.monotonic() - start
        text, cut = _read_truncated(out_path, max_output)
    code_ = None if timed_out else proc.returncode
    return RunResult(text, code_, timed_out, wall, cut)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_truncated(path: Path, limit: int) -> tuple[str, int]:
    """Head and tail of the output; the middle is dropped with a note of how much."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= limit * 4:
            text = f.read().decode("utf-8", errors="replace")
        else:  # don't read a runaway print loop's gigabytes
            head = f.read(limit * 2).decode("utf-8", errors="replace")
            f.seek(size - limit * 2)
            tail = f.read().decode("utf-8", errors="replace")
            text = head + "\x00" + tail
    if len(text) <= limit and "\x00" not in text:
        return text, 0
    head_n, tail_n = limit * 2 // 3, limit // 3
    omitted = size - head_n - tail_n if "\x00" in text else len(text) - head_n - tail_n
    head, tail = text[:head_n], text[-tail_n:]
    return f"{head}\n[... output truncated: {omitted} characters omitted ...]\n{tail}", omitted


@tool(name="python")
def python_tool(ctx: ToolContext, code: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ToolResult:
    """Run Python code in the task workspace (pillow, numpy and opencv available) and return its printed output.

    Each call is a fresh process: keep state in files. Print what you want to see.

    Args:
        code: the Python program to run
        timeout_s: wall-clock limit in seconds (at most 300)
    """
    workspace = workspace_of(ctx)
    if not code.strip():
        raise ToolError("code is empty")
    extra = ctx.extra if ctx is not None else {}
    limit = float(extra.get("python_max_timeout_s", MAX_TIMEOUT_S))
    if not (timeout_s > 0):
        raise ToolError(f"timeout_s must be positive, got {timeout_s}")
    timeout = min(timeout_s, limit)
    memory_mb = int(extra.get("python_memory_mb", DEFAULT_MEMORY_MB))
    r = run_python(
        code, workspace, timeout, memory_mb, int(extra.get("python_max_output", DEFAULT_MAX_OUTPUT))
    )
    data = {"exit_code": r.exit_code, "timed_out": r.timed_out, "wall_s": round(r.wall_s, 3)}
    body = r.output if r.output.strip() else "(no output)"
    if r.timed_out:
        return ToolResult(text=f"{body}\n[killed: timed out after {timeout:g} s]", is_error=True, data=data)
    if r.exit_code != 0:
        why = _signal_note(r.exit_code, memory_mb)
        return ToolResult(text=f"{body}\n[exit code {r.exit_code}{why}]", is_error=True, data=data)
    return ToolResult(text=body, data=data)


def _signal_note(code: int | None, memory_mb: int) -> str:
    if code is None or code >= 0:
        return ""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f": killed by signal {-code}"
    hint = {
        "SIGXCPU": "CPU time limit",
        "SIGXFSZ": "file size limit",
        "SIGKILL": f"killed (memory limit {memory_mb} MB?)",
    }
    return f": {name}" + (f", {hint[name]}" if name in hint else "")
