"""Code-editing tools: `edit_file`, `view_file`, `search`, confined to the task's workspace.

Errors teach: a snippet that is not found names the closest line, one found several times lists the
line numbers, a path outside the workspace says why. Each edit's result carries what changed
(`data`: path, kind, line, lines removed and added), which the trace keeps.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from advisor.tools.fswalk import Budget, PatternError, compile_regex, glob_regex, read_head, walk
from advisor.tools.spec import ToolContext, ToolError, ToolResult, tool
from advisor.tools.workspace import MAX_WRITE_BYTES, confine, os_errors, workspace_of

MAX_VIEW_LINES = 400
MAX_VIEW_CHARS = 24_000
MAX_SEARCH_RESULTS = 200
MAX_SEARCH_FILE_BYTES = 2_000_000  # read of each file; the rest of a larger one is not searched (said so)
MAX_SEARCH_TOTAL_BYTES = 256_000_000
MAX_VIEW_BYTES = 8_000_000  # read of a file by view_file (said so when the file is larger)
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".venv", "node_modules", ".mypy_cache", ".ruff_cache"}
CONTEXT_LINES = 3


def _read_text(real: Path, path: str, limit: int) -> tuple[str, int]:
    """The file's text, at most `limit` bytes of it, and its size in bytes."""
    if not real.exists():
        raise ToolError(f"file not found: {path}; use list_files to see what exists")
    if not real.is_file():
        raise ToolError(f"{path} is not a file; use list_files to look inside a folder")
    raw, size = read_head(real, limit)
    if b"\x00" in raw[:8192]:
        raise ToolError(f"{path} is a binary file ({size} bytes)")
    if size > len(raw):  # do not end on half a line or half a character
        raw = raw[: raw.rfind(b"\n") + 1] or raw
    return raw.decode("utf-8", errors="replace"), size


def _edit_text(real: Path, path: str) -> str:
    """The whole file, for an edit: one over the write limit is refused before it is read."""
    if real.is_file() and real.stat().st_size > MAX_WRITE_BYTES:
        raise ToolError(
            f"{path} is {real.stat().st_size} bytes, over the {MAX_WRITE_BYTES} byte limit of the edit "
            "tools; use shell or python to change it"
        )
    return _read_text(real, path, MAX_WRITE_BYTES + 1)[0]


def _write_text(real: Path, text: str) -> None:
    data = text.encode("utf-8")
    if len(data) > MAX_WRITE_BYTES:
        raise ToolError(f"the edited file would be {len(data)} bytes; the limit is {MAX_WRITE_BYTES}")
    real.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _numbered(lines: list[str], first: int) -> str:
    width = len(str(first + len(lines) - 1))
    return "\n".join(f"{first + i:>{width}}  {line}" for i, line in enumerate(lines))


def _around(text: str, line: int, count: int) -> str:
    """The edited region with a few lines either side, numbered."""
    lines = text.splitlines()
    lo = max(1, line - CONTEXT_LINES)
    hi = min(len(lines), line + max(count, 1) - 1 + CONTEXT_LINES)
    return _numbered(lines[lo - 1 : hi], lo) if lines else "(the file is now empty)"


def _closest(text: str, snippet: str) -> str:
    first = next((s for s in snippet.splitlines() if s.strip()), snippet).strip()
    lines = text.splitlines()
    best = difflib.get_close_matches(first, [ln.strip() for ln in lines], n=1, cutoff=0.6)
    if not best:
        return ""
    n = next(i for i, ln in enumerate(lines, 1) if ln.strip() == best[0])
    return f"; the closest line is {n}: {lines[n - 1].strip()!r} (check indentation and whitespace)"


@tool(changes_workspace=True)
@os_errors
def edit_file(
    ctx: ToolContext,
    path: str,
    old_text: str | None = None,
    new_text: str = "",
    insert_line: int | None = None,
) -> ToolResult:
    """Edit a text file in the workspace: replace a snippet, insert lines, or create a file.

    Replace: give `old_text` (an exact snippet that occurs once, with enough surrounding lines to be
    unique) and `new_text`. Insert: give `insert_line` (the new text goes before that line; one past
    the last line appends) and `new_text`. Create: give a new `path` and `new_text` only.

    Args:
        path: file path relative to the workspace
        old_text: the exact text to replace (whitespace matters)
        new_text: the replacement, the lines to insert, or the new file's content
        insert_line: 1-based line number to insert `new_text` before
    """
    root = workspace_of(ctx)
    real = confine(root, path)
    if old_text is not None and insert_line is not None:
        raise ToolError("give either old_text (to replace) or insert_line (to insert), not both")
    if old_text is None and insert_line is None:
        if real.exists():
            raise ToolError(
                f"{path} already exists; give old_text to replace a snippet or insert_line to insert "
                "(or use write_file to overwrite the whole file)"
            )
        _write_text(real, new_text)
        count = len(new_text.splitlines())
        data = {"path": path, "kind": "create", "line": 1, "removed_lines": 0, "added_lines": count}
        return ToolResult(f"created {path} ({count} lines)", data=data)
    text = _edit_text(real, path)
    if insert_line is not None:
        lines = text.splitlines(keepends=True)
        if not 1 <= insert_line <= len(lines) + 1:
            raise ToolError(
                f"insert_line {insert_line} is out of range: {path} has {len(lines)} lines "
                f"(use 1..{len(lines) + 1}; {len(lines) + 1} appends)"
            )
        if lines and not lines[-1].endswith("\n") and insert_line == len(lines) + 1:
            lines[-1] += "\n"
        block = new_text if new_text.endswith("\n") or not new_text else new_text + "\n"
        lines.insert(insert_line - 1, block)
        new = "".join(lines)
        line, removed = insert_line, 0
        kind = "insert"
    else:
        assert old_text is not None
        if old_text == "":
            raise ToolError("old_text is empty; give the exact text to replace")
        count = text.count(old_text)
        if count == 0:
            raise ToolError(
                f"old_text not found in {path}{_closest(text, old_text)}; view_file shows the file"
            )
        if count > 1:
            starts = [m.start() for m in re.finditer(re.escape(old_text), text)]
            at = ", ".join(str(text.count("\n", 0, s) + 1) for s in starts[:20])
            raise ToolError(
                f"old_text found {count} times in {path} (lines {at}); include more surrounding lines "
                "so that it occurs once"
            )
        pos = text.index(old_text)
        new = text[:pos] + new_text + text[pos + len(old_text) :]
        line = text.count("\n", 0, pos) + 1
        removed = len(old_text.splitlines()) or 1
        kind = "replace"
    _write_text(real, new)
    added = len(new_text.splitlines())
    data = {"path": path, "kind": kind, "line": line, "removed_lines": removed, "added_lines": added}
    verb = "inserted" if kind == "insert" else "replaced"
    head = f"{verb} in {path} at line {line} (-{removed} +{added} lines):"
    return ToolResult(head + "\n" + _around(new, line, added), data=data)


@tool
@os_errors
def view_file(ctx: ToolContext, path: str, start_line: int = 1, end_line: int | None = None) -> ToolResult:
    """Show a text file from the workspace with line numbers, or a range of its lines.

    Args:
        path: file path relative to the workspace
        start_line: first line to show (1-based)
        end_line: last line to show (inclusive); default: up to 400 lines from start_line
    """
    root = workspace_of(ctx)
    real = confine(root, path)
    text, size = _read_text(real, path, MAX_VIEW_BYTES)
    lines = text.splitlines()
    total = len(lines)
    partial = size > MAX_VIEW_BYTES
    cut = (
        f" (only the first {MAX_VIEW_BYTES // 1_000_000} MB of its {size} bytes were read; "
        "use shell or python for the rest)"
        if partial
        else ""
    )
    if total == 0:
        return ToolResult(f"{path} is empty", data={"path": path, "lines": 0})
    if start_line < 1 or start_line > total:
        raise ToolError(f"start_line {start_line} is out of range: {path} has {total} lines{cut}")
    last = total if end_line is None else end_line
    if last < start_line:
        raise ToolError(f"end_line {end_line} is before start_line {start_line}")
    last = min(last, total, start_line + MAX_VIEW_LINES - 1)
    shown = _numbered(lines[start_line - 1 : last], start_line)
    if len(shown) > MAX_VIEW_CHARS:
        shown = shown[:MAX_VIEW_CHARS].rsplit("\n", 1)[0]
        last = start_line + shown.count("\n")
    note = f"[{path}: lines {start_line}-{last} of {total}{'+' if partial else ''}{cut}"
    note += f"; view more with start_line={last + 1}]" if last < total else "]"
    data = {"path": path, "lines": total, "shown": [start_line, last], "bytes_read": len(text), "size": size}
    return ToolResult(shown + "\n" + note, data=data)


def _walk(root: Path, base: Path, glob: str | None, budget: Budget):
    """Regular files under `base` (links and FIFOs, sockets, devices skipped), filtered by `glob`."""
    rx = None
    if glob:
        try:
            rx = glob_regex(glob, anywhere=True)
        except PatternError as e:
            raise ToolError(f"glob {glob!r}: {e}") from None
    prefix = base.relative_to(root).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    for e in walk(base, budget, skip_dirs=SKIP_DIRS):
        if not e.is_file:
            continue  # a link may lead out of the workspace; folders are walked
        rel = prefix + e.rel
        if rx is not None and not (rx.match(rel) or rx.match(e.path.name)):
            continue
        yield e.path, rel


@tool
@os_errors
def search(
    ctx: ToolContext,
    pattern: str,
    path: str = ".",
    glob: str | None = None,
    ignore_case: bool = False,
    max_results: int = 100,
) -> ToolResult:
    """Search the workspace's text files for a regular expression; prints path:line: text for each match.

    Args:
        pattern: a regular expression (RE2 syntax: no backreferences or lookaround), e.g. `def parse_` or `TODO|FIXME`
        path: folder (or file) to search, relative to the workspace
        glob: only files whose path or name matches this glob, e.g. `*.py`
        ignore_case: match case-insensitively
        max_results: most matching lines to show (up to 200)
    """
    root = workspace_of(ctx)
    base = confine(root, path)
    try:
        rx = compile_regex(pattern, ignore_case)
    except PatternError as e:
        raise ToolError(
            f"invalid regular expression {pattern!r}: {e}; escape special characters such as ( [ . * with \\ "
            "(RE2 syntax: no backreferences or lookaround)"
        ) from None
    if not base.exists():
        raise ToolError(f"not found: {path}")
    if not (base.is_file() or base.is_dir()):
        raise ToolError(f"{path} is neither a regular file nor a folder (a FIFO, socket or device?)")
    cap = max(1, min(max_results, MAX_SEARCH_RESULTS))
    budget = Budget()
    if base.is_file():
        files = iter([(base, base.relative_to(root).as_posix())])
    else:
        files = _walk(root, base, glob, budget)
    hits: list[str] = []
    total = searched = 0
    matched_files: set[str] = set()
    partial: list[str] = []
    read_total = 0
    for p, rel in files:
        if read_total >= MAX_SEARCH_TOTAL_BYTES:
            budget.cut = budget.cut or f"stopped after reading {MAX_SEARCH_TOTAL_BYTES // 1_000_000} MB"
            break
        try:
            raw, size = read_head(p, MAX_SEARCH_FILE_BYTES)
        except OSError:
            continue  # not a regular file (any more), or unreadable
        read_total += len(raw)
        if b"\x00" in raw[:8192]:
            continue
        if size > len(raw):
            partial.append(rel)
        searched += 1
        for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if rx.search(line):
                total += 1
                matched_files.add(rel)
                if len(hits) < cap:
                    hits.append(f"{rel}:{n}: {line.strip()[:300]}")
    data = {"matches": total, "files": len(matched_files), "searched_files": searched, "shown": len(hits)}
    data["partially_read"] = partial[:20]
    notes = []
    if partial:
        names = ", ".join(partial[:5]) + (f" and {len(partial) - 5} more" if len(partial) > 5 else "")
        notes.append(f"[only the first {MAX_SEARCH_FILE_BYTES // 1_000_000} MB of {names} searched]")
    if budget.cut:
        data["incomplete"] = budget.cut
        notes.append(f"[search incomplete: {budget.cut}; narrow the path or glob]")
    if not hits:
        return ToolResult("\n".join([f"no matches for /{pattern}/ in {searched} files", *notes]), data=data)
    text = "\n".join(hits)
    if total > len(hits):
        text += f"\n[... {total - len(hits)} more matches not shown; narrow the pattern, path or glob ...]"
    return ToolResult("\n".join([text, *notes]), data=data)
