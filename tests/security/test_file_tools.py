"""The file tools turned against the host: links out of the workspace, catastrophic patterns, huge files,
FIFOs, sockets and `**`-heavy globs. Each call is bounded by a generous wait_for only so that a regression
fails instead of hanging the run; nothing asserts how fast it was."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from advisor.tools.registry import BUILTIN
from advisor.tools.spec import ToolContext

from advisor.workspace import diff, fill_from_folder, snapshot

LIST, SEARCH, VIEW, READ = (
    BUILTIN["list_files"],
    BUILTIN["search"],
    BUILTIN["view_file"],
    BUILTIN["read_file"],
)
HANG = 120  # seconds: far past any bounded call, short of a hung CI


async def call(tool, args: dict, ws: Path):
    return await asyncio.wait_for(tool.invoke(args, ToolContext(workspace=ws)), HANG)


@pytest.fixture
def links(ws):
    (ws / "src").mkdir()
    (ws / "src" / "main.py").write_text("print('hi')\n")
    for name, target in [("rootlink", "/"), ("etcdir", "/etc"), ("up", ".."), ("src/deep", "/root")]:
        (ws / name).symlink_to(target)
    return ws


@pytest.mark.parametrize(
    "args",
    [
        {"pattern": "rootlink/*"},
        {"pattern": "etcdir/*"},
        {"pattern": "up/*"},
        {"pattern": "**/*"},
        {"pattern": "**/passwd"},
        {"pattern": "*", "recursive": True},
        {"pattern": "*/*/*", "recursive": True},
        {"recursive": True},
        {"path": "src", "pattern": "deep/*"},
    ],
)
async def test_listing_never_follows_a_link_out_of_the_workspace(links, args):
    r = await call(LIST, args, links)
    assert not r.is_error or "refused" in r.text, r.text
    listed = "\n".join(r.data or []) if not r.is_error else ""
    for outside in ("passwd", "hostname", "etc/", "root/", "proc/", "ws/", "host/", "bin/"):
        assert outside not in listed.replace("rootlink", "").replace("etcdir", ""), (outside, r.text)
    if "pattern" in args and args["pattern"] in ("**/*", "*"):
        assert "rootlink -> (link outside the workspace, refused)" in r.text


async def test_listing_a_link_itself_is_refused(links):
    for path in ("rootlink", "etcdir", "up", "src/deep"):
        r = await call(LIST, {"path": path}, links)
        assert r.is_error and "outside the workspace" in r.text


async def test_catastrophic_regex_is_linear_and_a_bad_pattern_is_a_tool_error(ws):
    (ws / "a.txt").write_text("a" * 28 + "!\n" + "a" * 5000 + "!\n")
    r = await call(SEARCH, {"pattern": "(a+)+$"}, ws)
    r2 = await call(SEARCH, {"pattern": "(x+x+)+y"}, ws)
    assert not r.is_error and "no matches" in r.text and "no matches" in r2.text
    for bad in ("(a)\\1", "(?=a)", "(?<=a)b", "(unclosed"):
        e = await call(SEARCH, {"pattern": bad}, ws)
        assert e.is_error and "invalid regular expression" in e.text and "\n" not in e.text, e.text


async def test_huge_files_are_read_only_in_part_and_say_so(ws):
    big = ws / "big.log"
    with open(big, "wb") as f:  # noqa: ASYNC230 - set-up
        f.write(b"first line needle\n" * 1000)
        f.truncate(300 * 1024 * 1024)  # sparse: 300 MB on paper
        f.seek(300 * 1024 * 1024 - 20)
        f.write(b"\nlast line needle\n")
    v = await call(VIEW, {"path": "big.log", "end_line": 3}, ws)
    assert not v.is_error and "only the first 8 MB" in v.text and v.data["bytes_read"] <= 8_000_000
    assert v.data["size"] == 300 * 1024 * 1024
    s = await call(SEARCH, {"pattern": "needle"}, ws)
    assert "only the first 2 MB of big.log searched" in s.text and "last line" not in s.text
    assert s.data["partially_read"] == ["big.log"]
    edit = await call(BUILTIN["edit_file"], {"path": "big.log", "old_text": "first", "new_text": "x"}, ws)
    assert edit.is_error and "over the" in edit.text
    r = await call(READ, {"path": "big.log"}, ws)
    assert r.is_error and "byte limit" in r.text


@pytest.fixture
def specials(ws):
    (ws / "code.py").write_text("needle = 1\n")
    os.mkfifo(ws / "fifo")
    os.mkfifo(ws / "fifo.py")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(ws / "sock.py"))
    yield ws
    s.close()


async def test_fifos_and_sockets_are_skipped(specials):
    ws = specials
    s = await call(SEARCH, {"pattern": "needle"}, ws)
    assert s.text.startswith("code.py:1:") and s.data["searched_files"] == 1
    s = await call(SEARCH, {"pattern": "needle", "glob": "*.py"}, ws)
    assert s.data["searched_files"] == 1
    listing = await call(LIST, {"recursive": True}, ws)
    assert "code.py" in listing.text and "fifo" not in listing.text and "sock" not in listing.text
    for tool, args in [
        (VIEW, {"path": "fifo"}),
        (READ, {"path": "fifo.py"}),
        (SEARCH, {"pattern": "x", "path": "fifo"}),
    ]:
        r = await call(tool, args, ws)
        assert r.is_error, r.text
    before = await asyncio.wait_for(asyncio.to_thread(snapshot, ws), HANG)
    assert set(before.content) == {"code.py"}
    (ws / "code.py").write_text("needle = 2\n")
    changes = await asyncio.wait_for(asyncio.to_thread(diff, ws, before), HANG)
    assert "+needle = 2" in changes
    dest = ws.parent / "copy"
    await asyncio.wait_for(asyncio.to_thread(fill_from_folder, ws, dest), HANG)
    assert sorted(p.name for p in dest.iterdir()) == ["code.py"]


async def test_star_star_globs_are_one_bounded_walk(ws):
    d = ws
    for i in range(12):  # a chain 12 folders deep, a few files at each level
        d = d / f"d{i}"
        d.mkdir()
        for j in range(3):
            (d / f"f{j}.py").write_text("x = 1\n")
    pattern = "/".join(["**"] * 10) + "/f1.py"
    r = await call(LIST, {"pattern": pattern}, ws)
    assert not r.is_error and r.text.count("f1.py") == 12
    r = await call(SEARCH, {"pattern": "x", "glob": pattern}, ws)
    assert r.data["searched_files"] == 12
    r = await call(LIST, {"pattern": "**/" + "*" * 200 + "a[!b]?c"}, ws)
    assert "no files match" in r.text


async def test_walks_stop_at_their_budget_and_say_so(ws, monkeypatch):
    from advisor.tools import fswalk

    for i in range(50):
        (ws / f"f{i}.txt").write_text("needle\n")
    monkeypatch.setattr(fswalk, "MAX_WALK_ENTRIES", 20)
    r = await call(LIST, {"recursive": True}, ws)
    assert "listing incomplete: stopped after 20 entries" in r.text
    r = await call(SEARCH, {"pattern": "needle"}, ws)
    assert "search incomplete: stopped after 20 entries" in r.text and r.data["searched_files"] == 20
