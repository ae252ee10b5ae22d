"""Workspace file tools: read, write and list files, never outside the task's workspace.

Paths are relative to the workspace; absolute paths, `..` and symlinks that resolve outside it are
refused with a one-line error. (A symlink swapped in between the check and the open is not guarded
against; run untrusted tasks in a container.)
"""

from __future__ import annotations

import functools
import os
from pathlib import Path, PurePosixPath

from advisor.tools.fswalk import Budget, PatternError, glob_depth, glob_regex, read_head, walk
from advisor.tools.spec import ToolContext, ToolError, ToolResult, tool

MAX_READ_CHARS = 20_000
MAX_WRITE_BYTES = 2_000_000
MAX_READ_BYTES = 20_000_000
MAX_LIST_ENTRIES = 300
_SKIP = {".git", "__pycache__", ".pytest_cache", ".venv", "node_modules"}  # glob results leave these out


def workspace_of(ctx: ToolContext | None) -> Path:
    if ctx is None or ctx.workspace is None:
        raise ToolError("this task has no workspace")
    root = Path(ctx.workspace)
    if not root.is_dir():
        raise ToolError(f"the workspace {root.name} does not exist")
    return root.resolve()


def confine(root: Path, rel: str) -> Path:
    """The real path of `rel` inside `root`, or a ToolError saying why it is refused."""
    if not isinstance(rel, str) or not rel.strip():
        raise ToolError("path is empty; give a path relative to the workspace, e.g. notes.txt")
    if "\x00" in rel:
        raise ToolError("path contains a NUL byte")
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or rel.startswith("~") or (len(rel) > 1 and rel[1] == ":"):
        raise ToolError(f"absolute path {rel!r} refused; paths are relative to the workspace")
    if ".." in p.parts:
        raise ToolError(f"path {rel!r} refused: '..' may not leave the workspace")
    real = (root / p).resolve()
    if real != root and root not in real.parents:
        raise ToolError(f"path {rel!r} refused: it resolves outside the workspace (symlink)")
    return real


def os_errors(fn):
    """Turn OS failures (permissions, disk full, name too long) into a one-line tool error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            where = kwargs.get("path", "")
            raise ToolError(f"{where}: {e.strerror or type(e).__name__}" if where else str(e)) from None

    return wrapper


@tool
@os_errors
def read_file(ctx: ToolContext, path: str, offset: int = 0, max_chars: int = MAX_READ_CHARS) -> ToolResult:
    """Read a text file from the workspace.

    Args:
        path: file path relative to the workspace
        offset: character offset to start from (to page through long files)
        max_chars: most characters to return (up to 20000)
    """
    root = workspace_of(ctx)
    real = confine(root, path)
    if not real.exists():
        raise ToolError(f"file not found: {path}")
    if not real.is_file():
        raise ToolError(f"{path} is not a file; use list_files to look inside a directory")
    size = real.stat().st_size
    if size > MAX_READ_BYTES:
        raise ToolError(
            f"{path} is {size} bytes, over the {MAX_READ_BYTES} byte limit; use python to read parts of it"
        )
    raw, _ = read_head(real, MAX_READ_BYTES)  # a regular file only: a FIFO swapped in never blocks us
    if b"\x00" in raw[:8192]:
        raise ToolError(f"{path} is a binary file ({len(raw)} bytes); use python to inspect it")
    text = raw.decode("utf-8", errors="replace")
    offset = max(0, offset)
    max_chars = max(1, min(max_chars, MAX_READ_CHARS))
    chunk = text[offset : offset + max_chars]
    rest = len(text) - offset - len(chunk)
    if rest > 0:
        chunk += f"\n[... {rest} more characters; read again with offset={offset + len(chunk)} ...]"
    return ToolResult(text=chunk, data={"path": path, "chars": len(text)})


@tool(changes_workspace=True)
@os_errors
def write_file(ctx: ToolContext, path: str, content: str, append: bool = False) -> ToolResult:
    """Write (or append to) a text file in the workspace, creating folders as needed.

    Args:
        path: file path relative to the workspace
        content: the text to write
        append: add to the end of the file instead of replacing it
    """
    root = workspace_of(ctx)
    real = confine(root, path)
    data = content.encode("utf-8")
    if len(data) > MAX_WRITE_BYTES:
        raise ToolError(f"content is {len(data)} bytes; the limit is {MAX_WRITE_BYTES}")
    if real.is_dir():
        raise ToolError(f"{path} is a directory")
    real.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC) | os.O_NOFOLLOW
    fd = os.open(real, flags, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return ToolResult(text=f"{'appended' if append else 'wrote'} {len(data)} bytes to {path}")


@tool
@os_errors
def list_files(
    ctx: ToolContext, path: str = ".", recursive: bool = False, pattern: str | None = None
) -> ToolResult:
    """List files and folders in the workspace, optionally only those matching a glob.

    Args:
        path: folder relative to the workspace
        recursive: include the contents of sub-folders
        pattern: a glob relative to `path`, e.g. `*.py` or `**/test_*.py` (`**` reaches into sub-folders)
    """
    root = workspace_of(ctx)
    real = confine(root, path)
    if not real.is_dir():
        raise ToolError(f"{path} is not a folder" if real.exists() else f"folder not found: {path}")
    budget = Budget()
    if pattern is not None:
        if not pattern.strip() or pattern.startswith("/") or ".." in PurePosixPath(pattern).parts:
            raise ToolError(f"pattern {pattern!r} refused; give a glob relative to {path}, e.g. **/*.py")
        try:
            rx = glob_regex(pattern, anywhere=recursive)
        except PatternError as e:
            raise ToolError(f"pattern {pattern!r}: {e}") from None
        depth = None if recursive else glob_depth(pattern)
        # links are listed, never entered: a link to / or /etc shows as a link, not as their files
        found = walk(real, budget, skip_dirs=_SKIP, max_depth=depth)
        entries = [e for e in found if rx.match(e.rel)]
    else:
        entries = list(walk(real, budget, max_depth=None if recursive else 1))
    entries.sort(key=lambda e: e.rel)
    lines = []
    for e in entries[:MAX_LIST_ENTRIES]:
        if e.is_link:
            target = Path(os.path.realpath(e.path))
            inside = target == root or root in target.parents
            lines.append(f"{e.rel} -> {'(link)' if inside else '(link outside the workspace, refused)'}")
        elif e.is_dir:
            lines.append(e.rel + "/")
        else:
            lines.append(f"{e.rel}  {e.st.st_size} B")
    if len(entries) > MAX_LIST_ENTRIES:
        lines.append(f"[... {len(entries) - MAX_LIST_ENTRIES} more entries ...]")
    if budget.cut:
        lines.append(f"[listing incomplete: {budget.cut}; narrow the path or pattern]")
    empty = f"no files match {pattern!r} in {path}" if pattern is not None else f"{path} is empty"
    return ToolResult(text="\n".join(lines) if lines else empty, data=[str(x) for x in lines])
