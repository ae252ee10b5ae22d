"""Run model-written Python in a subprocess: in the workspace, time- and memory-limited, no secrets.

The child is this interpreter (`sys.executable`, so pillow, numpy and opencv are there) started in
its own session; on timeout every descendant and the whole process group are killed, and after a
normal exit the group is killed too, so background children do not outlive the call. Limits are
rlimits set by a small launcher inside the child (not `preexec_fn`, which is unsafe in threaded
parents). This is resource isolation, not a security boundary: the code can still read files the
user can read and open network connections; run untrusted tasks in a container.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from advisor.tools.spec import ToolContext, ToolError, ToolResult, tool
from advisor.tools.workspace import workspace_of

DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 300.0
DEFAULT_MEMORY_MB = 2048
DEFAULT_MAX_OUTPUT = 12_000  # characters of output the model sees
MAX_FILE_BYTES = 256 * 1024 * 1024
# Only these variables reach the child; everything else (API keys, tokens, proxies) stays behind.
ENV_ALLOW = ("PATH", "LANG", "LC_ALL", "TZ", "SYSTEMROOT")

_LAUNCHER = r"""
import linecache, resource, sys, traceback
def limit(kind, soft, hard):
    cap = resource.getrlimit(kind)[1]  # never ask above the inherited hard limit
    if cap != resource.RLIM_INFINITY:
        soft, hard = min(soft, cap), min(hard, cap)
    resource.setrlimit(kind, (soft, hard))
mem, cpu, fsize = (int(v) for v in sys.argv[1:4])
if mem > 0:
    limit(resource.RLIMIT_AS, mem, mem)
limit(resource.RLIMIT_CPU, cpu, cpu + 1)
limit(resource.RLIMIT_FSIZE, fsize, fsize)
limit(resource.RLIMIT_CORE, 0, 0)
del limit
with open(sys.argv[4], encoding="utf-8") as f:
    source = f.read()
sys.argv = ["<python>"]
sys.path.insert(0, "")
linecache.cache["<python>"] = (len(source), None, source.splitlines(True), "<python>")  # source lines in tracebacks
try:
    code = compile(source, "<python>", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit:
    raise
except BaseException as e:  # show the model its own frames, not this launcher's
    traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
    sys.exit(1)
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


def _argv(script: Path, timeout_s: float, memory_mb: int) -> list[str]:
    return [
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


class _Cell:
    """One run's scratch: the script and the output file, in a temp dir outside the workspace."""

    def __init__(self, code: str, workspace: Path) -> None:
        self.workspace = Path(workspace).resolve()
        self._tmp = tempfile.TemporaryDirectory(prefix="advisor-py-")
        self.tmp = Path(self._tmp.name)
        self.script = self.tmp / "cell.py"
        self.script.write_text(code, encoding="utf-8")
        self.out_path = self.tmp / "output.txt"
        # A file, not a pipe: a print loop fills a capped file, never our memory.
        self.out = open(self.out_path, "wb")  # closed in finish()

    def finish(self, max_output: int) -> tuple[str, int]:
        try:
            self.out.close()
            return _read_truncated(self.out_path, max_output)
        finally:
            self._tmp.cleanup()

    def popen_kwargs(self) -> dict:
        return dict(
            cwd=self.workspace,
            env=child_env(self.workspace, self.tmp),
            stdin=subprocess.DEVNULL,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so we can kill its children too
        )


async def run_python_async(
    code: str,
    workspace: Path,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> RunResult:
    """Run `code` with `workspace` as the working directory under the given limits.

    Async so that a 30 s script holds no worker thread: many tasks can run code at once.
    """
    cell = await asyncio.to_thread(_Cell, code, workspace)
    start = time.monotonic()
    timed_out = False
    try:
        proc = await asyncio.create_subprocess_exec(
            *_argv(cell.script, timeout_s, memory_mb), **cell.popen_kwargs()
        )
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            timed_out = True
            await asyncio.to_thread(_kill_tree, proc.pid)
        finally:  # also on cancellation; and it ends stray background children after a normal exit
            _kill_group(proc.pid)
            await asyncio.shield(proc.wait())
    finally:
        wall = time.monotonic() - start
        text, cut = await asyncio.to_thread(cell.finish, max_output)
    return RunResult(text, None if timed_out else proc.returncode, timed_out, wall, cut)


def run_python(
    code: str,
    workspace: Path,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> RunResult:
    """Blocking form of `run_python_async`, for scripts and worker threads."""
    cell = _Cell(code, workspace)
    start = time.monotonic()
    timed_out = False
    try:
        proc = subprocess.Popen(_argv(cell.script, timeout_s, memory_mb), **cell.popen_kwargs())
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(proc.pid)
        finally:
            _kill_group(proc.pid)
            proc.wait()
    finally:
        wall = time.monotonic() - start
        text, cut = cell.finish(max_output)
    return RunResult(text, None if timed_out else proc.returncode, timed_out, wall, cut)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(pid: int) -> list[int]:
    """All live descendants of pid, from /proc (Linux); catches children that left the process group."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(pid: int) -> None:
    """Kill the group, and first every descendant while the tree still links them to pid."""
    for child in _descendants(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _kill_group(pid)


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


IMAGES_DIR = "images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_NEW_IMAGES = 4
_LEDGER_FILE = re.compile(r"img_\d+\.png")


def export_images(ledger, workspace: Path) -> dict[str, int]:
    """Write the ledger's images to images/img_N.png (once each); return a snapshot of images/."""
    folder = workspace / IMAGES_DIR
    folder.mkdir(exist_ok=True)
    for image_id in ledger.ids():
        path = folder / f"{image_id}.png"
        if not path.exists():
            tmp = folder / f".{image_id}.{os.getpid()}.{threading.get_ident()}.tmp"
            ledger.get(image_id).save(tmp, format="PNG")
            os.replace(tmp, path)  # atomic: a concurrent call never sees half a file
    return _snapshot(folder)


def import_images(
    ledger, workspace: Path, before: dict[str, int]
) -> tuple[list[tuple[str, object]], list[str]]:
    """Add images the code saved (new or changed files in images/) to the ledger."""
    folder = workspace / IMAGES_DIR
    added, notes = [], []
    for name, mtime in sorted(_snapshot(folder).items()):
        if (
            before.get(name) == mtime
            or _LEDGER_FILE.fullmatch(name)
            or not name.lower().endswith(IMAGE_SUFFIXES)
        ):
            continue
        if len(added) == MAX_NEW_IMAGES:
            notes.append(f"[more new images in {IMAGES_DIR}/ not shown; at most {MAX_NEW_IMAGES} per call]")
            break
        try:
            new_id = ledger.load(folder / name, op="python")
        except ToolError as e:
            notes.append(f"[{IMAGES_DIR}/{name} not added: {e}]")
            continue
        added.append((new_id, ledger.get(new_id)))
        w, h = ledger.info(new_id).size
        notes.append(f"[new image {new_id}: {IMAGES_DIR}/{name}, {w}x{h} px]")
    return added, notes


def _snapshot(folder: Path) -> dict[str, int]:
    if not folder.is_dir():
        return {}
    return {
        p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
    }


@tool(name="python", changes_workspace=True)
async def python_tool(ctx: ToolContext, code: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ToolResult:
    """Run Python code in the task workspace (pillow, numpy and opencv available) and return its printed output.

    Each call is a fresh process: keep state in files and print what you want to see. The task's
    images are files images/img_0.png, images/img_1.png, ...; save a PNG or JPEG under a new name
    into images/ and it comes back to you as a new image id.

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
    max_output = int(extra.get("python_max_output", DEFAULT_MAX_OUTPUT))
    ledger = ctx.images
    images, notes, before = [], [], None
    if ledger is not None:
        try:
            before = await asyncio.to_thread(export_images, ledger, workspace)
        except OSError as e:  # e.g. the code made images/ a file: run anyway, say why images are missing
            notes.append(f"[task images not written to {IMAGES_DIR}/: {e.strerror or e}]")
    r = await run_python_async(code, workspace, timeout, memory_mb, max_output)
    if ledger is not None and before is not None:
        try:
            images, more = await asyncio.to_thread(import_images, ledger, workspace, before)
            notes += more
        except OSError as e:
            notes.append(f"[new images in {IMAGES_DIR}/ not read: {e.strerror or e}]")
    data = {"exit_code": r.exit_code, "timed_out": r.timed_out, "wall_s": round(r.wall_s, 3)}
    data["images"] = [i for i, _ in images]
    body = r.output if r.output.strip() else "(no output)"
    body = "\n".join([body.rstrip("\n"), *notes]) if notes else body
    if r.timed_out:
        return ToolResult(
            f"{body}\n[killed: timed out after {timeout:g} s]", images, is_error=True, data=data
        )
    if r.exit_code != 0:
        why = _signal_note(r.exit_code, memory_mb)
        return ToolResult(f"{body}\n[exit code {r.exit_code}{why}]", images, is_error=True, data=data)
    return ToolResult(body, images, data=data)


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
