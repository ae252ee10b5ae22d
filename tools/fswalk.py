"""Walking, globbing and reading a workspace without being turned against the host.

A walk never follows a symbolic link (a link is an entry, never a folder to enter), yields only
folders, regular files and links (FIFOs, sockets and devices are skipped: opening a FIFO blocks
forever), and stops after a bounded number of entries and seconds, saying so. Globs are compiled to
RE2 (linear time) and matched once per path, so `**` costs one walk however many times it appears.
Files are read through `read_head`: regular files only, opened without following a link and without
blocking, at most a given number of bytes.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import re2

MAX_WALK_ENTRIES = 200_000
MAX_WALK_S = 10.0


class PatternError(ValueError):
    """A regular expression or glob that cannot be compiled (the message says why)."""


def compile_regex(pattern: str, ignore_case: bool = False):
    """An RE2 regular expression (linear-time matching: no backtracking blow-up)."""
    opts = re2.Options()
    opts.log_errors = False
    opts.case_sensitive = not ignore_case
    try:
        return re2.compile(pattern, opts)
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise PatternError(why) from None


def _segment(seg: str) -> str:
    out, i = [], 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = seg.find("]", i + 2 if seg[i + 1 : i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re2.escape(c))
            else:
                body = seg[i + 1 : j]
                neg = body.startswith("!")
                body = body[1:] if neg else body
                body = body.replace("\\", "\\\\").replace("^", "\\^")
                out.append(f"[{'^/' if neg else ''}{body}]")
                i = j
        else:
            out.append(re2.escape(c))
        i += 1
    return "".join(out)


def glob_regex(pattern: str, anywhere: bool = False):
    """A glob over '/'-separated relative paths as RE2: `*` and `?` stay within a name, `**` spans folders.

    `anywhere`: the glob may match at any depth (as `Path.rglob`).
    """
    parts = [p for p in pattern.split("/") if p not in ("", ".")]
    if not parts:
        raise PatternError("empty glob")
    rx = ""
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        if part == "**":
            rx += ".*" if last else "(?:[^/]*/)*"
        else:
            rx += _segment(part) + ("" if last else "/")
    if anywhere:
        rx = "(?:[^/]*/)*" + rx
    opts = re2.Options()
    opts.log_errors = False
    try:
        return re2.compile(f"^(?:{rx})$", opts)
    except re2.error as e:
        raise PatternError(f"glob {pattern!r} cannot be compiled") from e


def glob_depth(pattern: str) -> int | None:
    """How many names deep a glob's matches lie, or None when `**` makes it any depth."""
    parts = [p for p in pattern.split("/") if p not in ("", ".")]
    return None if "**" in parts else len(parts)


@dataclass
class Budget:
    """How much a walk may visit; `cut` says why it stopped early."""

    max_entries: int | None = None  # default MAX_WALK_ENTRIES
    max_s: float | None = None  # default MAX_WALK_S
    entries: int = 0
    cut: str | None = None

    def __post_init__(self) -> None:
        self.max_entries = MAX_WALK_ENTRIES if self.max_entries is None else self.max_entries
        self.max_s = MAX_WALK_S if self.max_s is None else self.max_s
        self.deadline = time.monotonic() + self.max_s

    def spend(self) -> bool:
        self.entries += 1
        if self.entries > self.max_entries:
            self.cut = f"stopped after {self.max_entries} entries"
        elif self.entries % 256 == 0 and time.monotonic() > self.deadline:
            self.cut = f"stopped after {self.max_s:g} s"
        return self.cut is None


@dataclass
class Entry:
    path: Path
    rel: str  # relative to the walk's base, '/'-separated
    st: os.stat_result  # lstat: the link itself for a link

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.st.st_mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.st.st_mode)


def _kept(mode: int) -> bool:
    return stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)


def walk(
    base: Path, budget: Budget, skip_dirs: set[str] = frozenset(), max_depth: int | None = None
) -> Iterator[Entry]:
    """Entries under `base` in sorted order, depth first; links are yielded, never entered."""
    stack: list[tuple[Path, str, int]] = [(base, "", 0)]
    while stack:
        folder, prefix, depth = stack.pop()
        try:
            with os.scandir(folder) as it:
                names = sorted((e.name, e) for e in it)
        except OSError:
            continue
        subdirs = []
        for name, e in names:
            if not budget.spend():
                return
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if not _kept(st.st_mode):
                continue  # FIFO, socket, device: never opened
            rel = f"{prefix}{name}"
            entry = Entry(Path(e.path), rel, st)
            if entry.is_dir and name in skip_dirs:
                continue
            yield entry
            if entry.is_dir and (max_depth is None or depth + 1 < max_depth):
                subdirs.append((Path(e.path), rel + "/", depth + 1))
        stack.extend(reversed(subdirs))


def read_head(path: Path, limit: int) -> tuple[bytes, int]:
    """Up to `limit` bytes of a regular file, and its size. OSError for a link, FIFO, device or socket."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        chunks, left = [], limit
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks), st.st_size
    finally:
        os.close(fd)
