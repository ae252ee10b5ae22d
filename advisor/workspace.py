"""A task's workspace: filled from a folder or a git revision, and its final diff against that start.

The original folder or repository is only read: a folder is copied, a repository cloned (no hard
links) and the clone checked out at the revision. Before the first step the workspace's text files
are snapshotted; at the end `diff` gives a unified diff of what the run changed, added and deleted.
"""

from __future__ import annotations

import difflib
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".venv", "node_modules"}
MAX_FILE_BYTES = 1_000_000  # larger files are compared by size and time only
MAX_SNAPSHOT_BYTES = 200_000_000
MAX_DIFF_CHARS = 200_000


class WorkspaceError(Exception):
    """The workspace could not be filled (a one-line reason)."""


def split_git(spec: str) -> tuple[str, str]:
    """'PATH@REV' -> (PATH, REV); REV defaults to HEAD. The last '@' splits, so paths may contain one."""
    path, sep, rev = spec.rpartition("@")
    if not sep or not path:
        return spec, "HEAD"
    return path, rev or "HEAD"


def _git(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1")
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def resolve_rev(repo: Path, rev: str) -> str | None:
    """The commit `rev` names in `repo`, or None."""
    try:
        p = _git("-C", str(repo), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _special_files(folder: str, names: list[str]) -> set[str]:
    """FIFOs, sockets and devices in a folder being copied: left out (copying a FIFO blocks forever)."""
    out = set()
    for name in names:
        try:
            mode = os.lstat(os.path.join(folder, name)).st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            out.add(name)
    return out


def fill_from_folder(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True, ignore=_special_files)


def fill_from_git(repo: Path, rev: str, dest: Path) -> str:
    """Clone `repo` into `dest` (which must be empty or absent) at `rev`; returns the commit."""
    commit = resolve_rev(repo, rev)
    if commit is None:
        raise WorkspaceError(f"{repo}: revision {rev!r} not found")
    dest.mkdir(parents=True, exist_ok=True)
    steps = [
        ("clone", "--quiet", "--no-hardlinks", "--no-checkout", str(repo), str(dest)),
        ("-C", str(dest), "checkout", "--quiet", "--detach", commit),
    ]
    for args in steps:
        p = _git(*args)
        if p.returncode != 0:
            why = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
            raise WorkspaceError(
                f"git {args[0] if args[0] != '-C' else args[2]} of {repo}@{rev} failed: {why}"
            )
    return commit


def _files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            yield p.relative_to(root).as_posix(), p


@dataclass
class Snapshot:
    """The workspace's files at the start: small files by content, large ones by (size, mtime)."""

    content: dict[str, bytes] = field(default_factory=dict)
    stat: dict[str, tuple[int, int]] = field(default_factory=dict)


def snapshot(root: Path) -> Snapshot:
    snap, total = Snapshot(), 0
    for rel, p in _files(root):
        try:
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                snap.content[rel] = b"-> " + os.readlink(p).encode()
            elif not stat.S_ISREG(st.st_mode):
                continue  # a FIFO, socket or device: opening one could block the run forever
            elif st.st_size <= MAX_FILE_BYTES and total + st.st_size <= MAX_SNAPSHOT_BYTES:
                snap.content[rel] = _read_regular(p, MAX_FILE_BYTES)
                total += st.st_size
            else:
                snap.stat[rel] = (st.st_size, st.st_mtime_ns)
        except OSError:
            continue
    return snap


def _read_regular(p: Path, limit: int) -> bytes:
    """A regular file's bytes (at most `limit`), never following a link or blocking on a FIFO swapped in."""
    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit)
    finally:
        os.close(fd)


def _lines(data: bytes) -> list[str] | None:
    if b"\x00" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace").splitlines(keepends=True)


def diff(root: Path, before: Snapshot, *, ignore: set[str] = frozenset()) -> str:
    """Unified diff (a/ -> b/) of the workspace now against `before`; binary files are named only."""
    now = snapshot(root)
    names = sorted((set(before.content) | set(before.stat) | set(now.content) | set(now.stat)) - ignore)
    out: list[str] = []
    for rel in names:
        old, new = before.content.get(rel), now.content.get(rel)
        if old is None and new is None:
            if before.stat.get(rel) != now.stat.get(rel):
                out.append(f"Large file {rel} changed\n")
            continue
        if old == new:
            continue
        if old is None and rel in before.stat or new is None and rel in now.stat:
            out.append(f"Large file {rel} changed\n")
            continue
        a, b = _lines(old or b""), _lines(new or b"")
        if a is None or b is None:
            out.append(
                f"Binary file {rel} {'added' if old is None else 'deleted' if new is None else 'changed'}\n"
            )
            continue
        src = "/dev/null" if old is None else f"a/{rel}"
        dst = "/dev/null" if new is None else f"b/{rel}"
        for line in difflib.unified_diff(a, b, src, dst):
            out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    text = "".join(out)
    if len(text) > MAX_DIFF_CHARS:
        text = (
            text[:MAX_DIFF_CHARS]
            + f"\n[... diff truncated: {len(text) - MAX_DIFF_CHARS} more characters ...]\n"
        )
    return text
