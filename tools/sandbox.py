"""The `python` tool: model-written Python in the task's workspace, confined like the shell tool.

The child is this interpreter (`sys.executable`, so pillow, numpy and opencv are there) run through
advisor.tools.confine: in bwrap by default where bubblewrap works (else the limits mode; `sandbox:
none` only when the task says so), in a clean environment, time-, memory- and process-limited, its
launcher a child subreaper so that no background or double-forked child outlives the call.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from advisor.tools import confine
from advisor.tools.confine import SandboxUnavailable
from advisor.tools.spec import ToolContext, ToolError, ToolResult, tool
from advisor.tools.workspace import workspace_of

DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 300.0
DEFAULT_MEMORY_MB = 2048
DEFAULT_MAX_OUTPUT = 12_000  # characters of output the model sees
DEFAULT_MAX_PROCESSES = 256
MAX_FILE_BYTES = 256 * 1024 * 1024

_LAUNCHER = r"""
import linecache, sys, traceback
with open(sys.argv[1], encoding="utf-8") as f:
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


def _argv(script: Path) -> list[str]:
    return [sys.executable, "-E", "-s", "-c", _LAUNCHER, str(script)]


class _Cell:
    """One run: the script in the call's scratch folder, the output file beside it, the confinement."""

    def __init__(self, code: str, workspace: Path, mode: str, timeout_s: float, memory_mb: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="advisor-py-"))
        self.script = self.tmp / "cell.py"
        self.script.write_text(code, encoding="utf-8")
        self.out_path = self.tmp.parent / f"{self.tmp.name}.out"  # outside what the code can reach
        # A file, not a pipe: a print loop fills a capped file, never our memory.
        fd = os.open(self.out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # no other uid reads it
        self.out = os.fdopen(fd, "wb")  # closed in finish()
        try:
            self.box = confine.prepare(
                _argv(self.script),
                workspace,
                mode,
                memory_mb=memory_mb,
                max_processes=DEFAULT_MAX_PROCESSES,
                max_file_mb=MAX_FILE_BYTES // (1024 * 1024),
                cpu_s=int(timeout_s) + 2,
                scratch=self.tmp,
                address_space_cap=True,
            )
        except BaseException:
            self.out.close()
            self.out_path.unlink(missing_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def finish(self, max_output: int) -> tuple[str, int]:
        try:
            self.out.close()
            return _read_truncated(self.out_path, max_output)
        finally:
            self.out_path.unlink(missing_ok=True)
            self.box.close()

    def popen_kwargs(self) -> dict:
        return dict(
            cwd=self.box.cwd,
            env=self.box.env,
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
    sandbox: str = "auto",
) -> RunResult:
    """Run `code` with `workspace` as the working directory under the given limits and sandbox.

    Async so that a 30 s script holds no worker thread: many tasks can run code at once. Raises
    `SandboxUnavailable` when the sandbox cannot run here.
    """
    mode = await asyncio.to_thread(_resolve, sandbox)
    cell = await asyncio.to_thread(_Cell, code, workspace, mode, timeout_s, memory_mb)
    start = time.monotonic()
    timed_out = False
    try:
        proc = await asyncio.create_subprocess_exec(*cell.box.argv, **cell.popen_kwargs())
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            timed_out = True
        finally:  # also on cancellation; and it ends stray background children after a normal exit
            gone = cell.box.pid_namespace and proc.returncode is not None  # bwrap ended: so did its namespace
            await asyncio.to_thread(confine.kill_all, proc.pid, cell.box.cgroup, gone)
            await asyncio.shield(proc.wait())
    finally:
        wall = time.monotonic() - start
        text, cut = await asyncio.to_thread(cell.finish, max_output)
    return RunResult(text, None if timed_out else proc.returncode, timed_out, wall, cut)


def _resolve(sandbox: str) -> str:
    mode = confine.resolve(sandbox)
    if mode == "limits" and confine.is_root() and not confine.reachable_by_others(sys.executable):
        raise SandboxUnavailable(
            f"sandbox limits runs code as an unprivileged uid, which cannot reach this Python "
            f"({sys.executable} is under a folder closed to other users); install bubblewrap, or put "
            "advisor's Python where any user may run it"
        )
    confine.announce(mode)
    return mode


def run_python(
    code: str,
    workspace: Path,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    max_output: int = DEFAULT_MAX_OUTPUT,
    sandbox: str = "auto",
) -> RunResult:
    """Blocking form of `run_python_async`, for scripts and worker threads."""
    mode = _resolve(sandbox)
    cell = _Cell(code, workspace, mode, timeout_s, memory_mb)
    start = time.monotonic()
    timed_out = False
    try:
        proc = subprocess.Popen(cell.box.argv, **cell.popen_kwargs())
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            confine.kill_all(proc.pid, cell.box.cgroup)
            proc.wait()
    finally:
        wall = time.monotonic() - start
        text, cut = cell.finish(max_output)
    return RunResult(text, None if timed_out else proc.returncode, timed_out, wall, cut)


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
    sandbox = getattr(extra.get("shell"), "sandbox", "auto")
    try:
        r = await run_python_async(code, workspace, timeout, memory_mb, max_output, sandbox)
    except SandboxUnavailable as e:
        raise ToolError(str(e)) from None
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
    if code is not None and code > 128:  # bwrap reports a child killed by a signal as 128 + its number
        code = 128 - code
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
