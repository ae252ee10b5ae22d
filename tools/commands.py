"""Run a command line in a task's workspace, confined, bounded and always cleaned up.

The confinement (bwrap, limits or none; `auto` picks) is advisor.tools.confine's, shared with the
python tool and command checks. Output is read from pipes into bounded buffers (head and tail kept,
the middle counted), so an infinite print loop costs neither memory nor disk; past
`max_output_bytes` the command is killed. A timeout, the output limit or cancelling the call kills
every process the command made (its cgroup, the launcher's descendants, its PID namespace).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from advisor.tools import confine
from advisor.tools.confine import Mode, SandboxUnavailable, bwrap_problem

Sandbox = Mode
__all__ = ["Limits", "CommandResult", "SandboxUnavailable", "bwrap_problem", "require_sandbox", "run_command"]


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


def require_sandbox(sandbox: str) -> str:
    """The mode `sandbox` resolves to here, or `SandboxUnavailable` with a one-line reason."""
    return confine.resolve(sandbox)


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
    sandbox: Sandbox = "auto",
    limits: Limits = Limits(),
) -> CommandResult:
    """Run `command` (a bash command line) with `workspace` as its working directory.

    Async: no thread is held while it runs, and cancelling the call kills every process it made.
    Raises `SandboxUnavailable` when the sandbox cannot run here.
    """
    mode = await asyncio.to_thread(require_sandbox, sandbox)  # the first check runs bwrap once
    confine.announce(mode)
    shell = shutil.which("bash") or "/bin/sh"
    box = await asyncio.to_thread(
        confine.prepare,
        [shell, "-c", command],
        workspace,
        mode,
        memory_mb=limits.memory_mb,
        max_processes=limits.max_processes,
        max_file_mb=limits.max_file_mb,
        network=limits.network,
    )
    keep = limits.max_output_chars * 4  # bytes; utf-8 may take up to 4 per character
    out_cap, err_cap = _Capture(keep), _Capture(keep)
    over = asyncio.Event()
    start = time.monotonic()
    timed_out, killed = False, None
    proc = None
    try:
        proc = await asyncio.create_subprocess_exec(
            *box.argv,
            cwd=box.cwd,
            env=box.env,
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
            gone = box.pid_namespace and proc.returncode is not None  # bwrap ended: its namespace too
            await asyncio.to_thread(confine.kill_all, proc.pid, box.cgroup, gone)
            await asyncio.shield(waiter)
            try:  # every process is dead, so the pipes reach EOF
                await asyncio.wait_for(asyncio.gather(*pumps), 5)
            except TimeoutError:
                for p in pumps:
                    p.cancel()
    finally:
        wall = time.monotonic() - start
        await asyncio.to_thread(box.close)
    stdout, out_cut = out_cap.text(limits.max_output_chars)
    stderr, err_cut = err_cap.text(limits.max_output_chars)
    confinement = {
        "cgroups": box.cgroup.controllers if box.cgroup else [],
        "network": limits.network if mode == "bwrap" else True,
        "uid": box.uid,
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
        mode,
        confinement,
    )


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
