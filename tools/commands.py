"""Run a command line in a task's workspace, confined, bounded and always cleaned up.

Two sandboxes:

- `bwrap` (bubblewrap): the system read-only, the workspace read-write, a private /tmp, /dev and /proc,
  new PID, IPC, UTS and network namespaces (the network only when the task allows it), the command
  in its own session, killed with its sandbox when we go.
- `limits`: a process group with rlimits, without file-system or network confinement.

Both also get, where the kernel lets us (cgroup v1 `pids` and `memory` controllers writable, as for
root in a container), a cgroup per command: `pids.max` stops a fork loop and `memory.limit_in_bytes`
caps the whole tree. Without cgroups the process limit is RLIMIT_NPROC (which the kernel does not
apply to root) and memory is RLIMIT_AS per process. Either way a timeout kills every process of the
command: the cgroup's members, the process group, and a /proc sweep of descendants.

Output is read from pipes into bounded buffers (head and tail kept, the middle counted), so an
infinite print loop costs neither memory nor disk; past `max_output_bytes` the command is killed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from advisor.tools.sandbox import _kill_group, _kill_tree, child_env

Sandbox = Literal["bwrap", "limits"]
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "advisor"


class SandboxUnavailable(Exception):
    """The configured sandbox cannot run here; the message says why and what to use instead."""


@dataclass(frozen=True)
class Limits:
    """What one command may use."""

    timeout_s: float = 60.0
    memory_mb: int = 2048  # the whole process tree with cgroups, else each process (RLIMIT_AS)
    max_processes: int = 256
    max_file_mb: int = 512  # largest file the command may write (RLIMIT_FSIZE)
    max_output_chars: int = 12_000  # per stream, what the model sees
    max_output_bytes: int = 64 * 1024 * 1024  # per stream; past it the command is killed
    network: bool = False  # bwrap only: limits cannot take the network away


@dataclass
class CommandResult:
    stdout: str
    stderr: str
    exit_code: int | None  # None when killed (timeout, output limit)
    timed_out: bool
    wall_s: float
    stdout_omitted: int = 0  # characters elided from the middle
    stderr_omitted: int = 0
    killed: str | None = None  # "timeout" | "output_limit"
    sandbox: str = "limits"
    confinement: dict = field(default_factory=dict)  # cgroup: bool, which limits applied

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


# -- availability -------------------------------------------------------------------------------


@functools.cache
def bwrap_problem() -> str | None:
    """None when bubblewrap runs here, else one line saying why not (cached per process)."""
    exe = shutil.which("bwrap")
    if exe is None:
        return "bwrap (bubblewrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    try:
        p = subprocess.run(
            [exe, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all"]
            + ["--die-with-parent", "true"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap cannot start: {e}"
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        return f"bwrap cannot create its namespaces here ({why}; no user namespaces in this container?)"
    return None


def require_sandbox(sandbox: str) -> None:
    """Raise `SandboxUnavailable` with a one-line reason when `sandbox` cannot run here."""
    if sandbox == "bwrap":
        problem = bwrap_problem()
        if problem:
            raise SandboxUnavailable(
                f"shell sandbox bwrap unavailable: {problem}; install it, or set `shell: {{sandbox: limits}}` "
                "(process limits only, no file-system confinement)"
            )
    elif sandbox != "limits":
        raise SandboxUnavailable(f"unknown shell sandbox {sandbox!r}; use bwrap or limits")


# -- cgroups --------------------------------------------------------------------------------------


class _Cgroup:
    """One command's cgroups (v1 pids and memory), when this process may create them."""

    def __init__(self, dirs: list[Path]):
        self.dirs = dirs

    @classmethod
    def create(cls, limits: Limits) -> _Cgroup | None:
        if os.environ.get("ADVISOR_NO_CGROUPS"):
            return None
        name = f"cmd-{os.getpid()}-{secrets.token_hex(4)}"
        settings = {
            "pids": {"pids.max": str(limits.max_processes)},
            "memory": {"memory.limit_in_bytes": str(limits.memory_mb * 1024 * 1024)},
        }
        made: list[Path] = []
        for controller, files in settings.items():
            base = CGROUP_ROOT / controller
            if not (base / "cgroup.procs").exists():
                continue
            d = base / CGROUP_PARENT / name
            try:
                d.mkdir(parents=True)
                for fname, value in files.items():
                    (d / fname).write_text(value)
                if controller == "memory" and (d / "memory.memsw.limit_in_bytes").exists():
                    try:  # no swapping around the cap
                        (d / "memory.memsw.limit_in_bytes").write_text(files["memory.limit_in_bytes"])
                    except OSError:
                        pass
            except OSError:
                _rmdir(d)
                continue
            made.append(d)
        return cls(made) if made else None

    @property
    def controllers(self) -> list[str]:
        return [d.parent.parent.name for d in self.dirs]

    def pids(self) -> list[int]:
        out: set[int] = set()
        for d in self.dirs:
            try:
                out.update(int(x) for x in (d / "cgroup.procs").read_text().split())
            except OSError:
                pass
        return sorted(out)

    def kill(self, rounds: int = 50) -> None:
        # a fork loop keeps adding members while we kill; pids.max bounds it, a few rounds empty it
        for _ in range(rounds):
            members = self.pids()
            if not members:
                return
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        left = list(self.dirs)
        while left and time.monotonic() < deadline:  # members leave when they are reaped
            self.kill(rounds=1)
            left = [d for d in left if not _rmdir(d)]
            if left:
                time.sleep(0.02)


def _rmdir(d: Path) -> bool:
    try:
        d.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


# -- launching ----------------------------------------------------------------------------------

# Runs in the child before the command: join the cgroups (so every descendant is counted from the
# first fork), set rlimits, exec. Not preexec_fn, which is unsafe in threaded parents.
_LAUNCHER = r"""
import os, resource, sys
def limit(kind, value):
    cap = resource.getrlimit(kind)[1]
    if cap != resource.RLIM_INFINITY:
        value = min(value, cap)
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass
pids_cg, mem_cg, mem, nproc, fsize = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def join(procs_file):  # False when there is no such cgroup or it cannot be joined: the rlimit stands in
    try:
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))
        return True
    except OSError:
        return False
if not (mem_cg and join(mem_cg)) and mem > 0:
    limit(resource.RLIMIT_AS, mem)
if not (pids_cg and join(pids_cg)) and nproc > 0:
    limit(resource.RLIMIT_NPROC, nproc)
limit(resource.RLIMIT_FSIZE, fsize)
limit(resource.RLIMIT_CORE, 0)
os.execvp(sys.argv[6], sys.argv[6:])
"""


def _user_processes() -> int:
    uid = os.getuid()
    n = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                n += entry.stat().st_uid == uid
            except OSError:
                pass
    return n


def _bwrap_argv(workspace: Path, tmp: Path, network: bool) -> list[str]:
    argv = [shutil.which("bwrap") or "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    argv += ["--tmpfs", "/tmp", "--bind", str(tmp), str(tmp)]  # TMPDIR lives outside the workspace
    argv += ["--bind", str(workspace), str(workspace), "--chdir", str(workspace)]
    argv += ["--unshare-all"] + (["--share-net"] if network else [])
    argv += ["--die-with-parent", "--new-session"]
    return argv


def command_argv(
    command: str, workspace: Path, tmp: Path, sandbox: Sandbox, limits: Limits, cgroup: _Cgroup | None
) -> list[str]:
    shell = shutil.which("bash") or "/bin/sh"
    inner = [shell, "-c", command]
    if sandbox == "bwrap":
        inner = _bwrap_argv(workspace, tmp, limits.network) + inner
    procs = {d.parent.parent.name: str(d / "cgroup.procs") for d in cgroup.dirs} if cgroup else {}
    mem = limits.memory_mb * 1024 * 1024
    # RLIMIT_NPROC counts all of the user's processes: allow what is running already plus the cap
    nproc = _user_processes() + limits.max_processes
    fsize = limits.max_file_mb * 1024 * 1024
    cgroups = [procs.get("pids", ""), procs.get("memory", "")]
    return [sys.executable, "-E", "-s", "-c", _LAUNCHER, *cgroups, str(mem), str(nproc), str(fsize), *inner]


def _setup(command: str, workspace: Path, sandbox: Sandbox, limits: Limits):
    workspace = Path(workspace).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="advisor-sh-"))
    cgroup = _Cgroup.create(limits)
    return workspace, tmp, cgroup, command_argv(command, workspace, tmp, sandbox, limits, cgroup)


class _Capture:
    """A stream's head and tail, with a count of what fell between them."""

    def __init__(self, keep: int):
        self.keep = keep
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.keep - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > self.keep:
                del self.tail[: len(self.tail) - self.keep]

    def text(self, max_chars: int) -> tuple[str, int]:
        head = self.head.decode("utf-8", errors="replace")
        tail = self.tail.decode("utf-8", errors="replace")
        dropped = self.total - len(self.head) - len(self.tail)
        whole = head + tail if dropped == 0 else None
        if whole is not None and len(whole) <= max_chars:
            return whole, 0
        head_n, tail_n = max_chars * 2 // 3, max_chars // 3
        text = whole if whole is not None else head + tail
        omitted = max(0, len(text) - head_n - tail_n) + dropped
        cut_head, cut_tail = text[:head_n], text[-tail_n:] if tail_n else ""
        return f"{cut_head}\n[... {omitted} characters omitted ...]\n{cut_tail}", omitted


async def _pump(stream: asyncio.StreamReader, cap: _Capture, over: asyncio.Event, limit: int) -> None:
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return
        cap.add(chunk)
        if cap.total > limit:
            over.set()


async def run_command(
    command: str,
    workspace: Path,
    *,
    sandbox: Sandbox = "bwrap",
    limits: Limits = Limits(),
) -> CommandResult:
    """Run `command` (a bash command line) with `workspace` as its working directory.

    Async: no thread is held while it runs, and cancelling the call kills every process it made.
    Raises `SandboxUnavailable` when the sandbox cannot run here.
    """
    await asyncio.to_thread(require_sandbox, sandbox)  # the first check runs bwrap once
    workspace, tmp, cgroup, argv = await asyncio.to_thread(_setup, command, workspace, sandbox, limits)
    env = child_env(workspace, tmp)
    keep = limits.max_output_chars * 4  # bytes; utf-8 may take up to 4 per character
    out_cap, err_cap = _Capture(keep), _Capture(keep)
    over = asyncio.Event()
    start = time.monotonic()
    timed_out, killed = False, None
    proc = None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=workspace,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            asyncio.create_task(_pump(proc.stdout, out_cap, over, limits.max_output_bytes)),
            asyncio.create_task(_pump(proc.stderr, err_cap, over, limits.max_output_bytes)),
        ]
        waiter = asyncio.create_task(proc.wait())
        flood = asyncio.create_task(over.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, flood}, timeout=limits.timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if waiter not in done:
                if flood in done:
                    killed = "output_limit"
                else:
                    timed_out, killed = True, "timeout"
        finally:
            flood.cancel()
            # also on cancellation: nothing the command started outlives the call
            await asyncio.to_thread(_kill_all, proc.pid, cgroup)
            await asyncio.shield(waiter)
            try:  # background processes are dead, so the pipes reach EOF
                await asyncio.wait_for(asyncio.gather(*pumps), 5)
            except TimeoutError:
                for p in pumps:
                    p.cancel()
    finally:
        wall = time.monotonic() - start
        if cgroup is not None:
            await asyncio.to_thread(cgroup.remove)
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    stdout, out_cut = out_cap.text(limits.max_output_chars)
    stderr, err_cut = err_cap.text(limits.max_output_chars)
    confinement = {
        "cgroups": cgroup.controllers if cgroup else [],
        "network": limits.network if sandbox == "bwrap" else True,
    }
    return CommandResult(
        stdout,
        stderr,
        None if killed else proc.returncode,
        timed_out,
        round(wall, 3),
        out_cut,
        err_cut,
        killed,
        sandbox,
        confinement,
    )


def _kill_all(pid: int, cgroup: _Cgroup | None) -> None:
    if cgroup is not None:
        cgroup.kill()
    _kill_tree(pid)
    _kill_group(pid)


def exit_note(r: CommandResult, limits: Limits) -> str:
    """One line on how the command ended, for the model."""
    if r.killed == "timeout":
        return f"[killed: timed out after {limits.timeout_s:g} s]"
    if r.killed == "output_limit":
        return f"[killed: more than {limits.max_output_bytes // (1024 * 1024)} MB of output]"
    code = r.exit_code
    hint = {"SIGKILL": f" (memory limit {limits.memory_mb} MB?)", "SIGXFSZ": " (file size limit)"}
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"[exit: killed by {name}{hint.get(name, '')}]"
    if code is not None and code - 128 in (9, 24, 25):  # bash's code for a child killed by a signal
        name = signal.Signals(code - 128).name
        return f"[exit code {code}: {name}{hint.get(name, '')}]"
    return f"[exit code {code}]"


def format_result(r: CommandResult, limits: Limits) -> str:
    parts = []
    if r.stdout:
        parts.append(r.stdout.rstrip("\n"))
    if r.stderr:
        parts.append("[stderr]\n" + r.stderr.rstrip("\n"))
    if not parts:
        parts.append("(no output)")
    parts.append(exit_note(r, limits) + f" in {r.wall_s:.2f} s")
    return "\n".join(parts)
