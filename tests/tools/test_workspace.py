import os

import pytest
from advisor.tools.registry import BUILTIN
from advisor.tools.spec import ToolContext

READ, WRITE, LIST = BUILTIN["read_file"], BUILTIN["write_file"], BUILTIN["list_files"]


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("outside the workspace")
    return ToolContext(workspace=root)


async def test_write_read_list_round_trip(ws):
    r = await WRITE.invoke({"path": "notes/a.txt", "content": "hello\n"}, ws)
    assert not r.is_error and r.text == "wrote 6 bytes to notes/a.txt"
    await WRITE.invoke({"path": "notes/a.txt", "content": "world\n", "append": True}, ws)
    assert (await READ.invoke({"path": "notes/a.txt"}, ws)).text == "hello\nworld\n"
    assert (await READ.invoke({"path": "./notes//a.txt", "offset": 6}, ws)).text == "world\n"
    listing = (await LIST.invoke({}, ws)).text
    assert listing == "notes/"
    assert (await LIST.invoke({"path": "notes", "recursive": True}, ws)).text == "a.txt  12 B"


async def test_paging_long_files(ws):
    (ws.workspace / "long.txt").write_text("x" * 50_000)
    r = await READ.invoke({"path": "long.txt", "max_chars": 1000}, ws)
    assert r.text.startswith("x" * 1000) and "49000 more characters; read again with offset=1000" in r.text


@pytest.mark.parametrize(
    "path,needle",
    [
        ("../secret.txt", "'..' may not leave the workspace"),
        ("notes/../../secret.txt", "'..' may not leave"),
        ("/etc/passwd", "absolute path '/etc/passwd' refused"),
        ("~/x", "absolute path"),
        ("", "path is empty"),
    ],
)
async def test_escapes_are_refused(ws, path, needle):
    for spec, args in (
        (READ, {"path": path}),
        (WRITE, {"path": path, "content": "x"}),
        (LIST, {"path": path}),
    ):
        r = await spec.invoke(args, ws)
        assert r.is_error and needle in r.text, (spec.name, r.text)
    assert (ws.workspace.parent / "secret.txt").read_text() == "outside the workspace"


async def test_symlinks_leaving_the_workspace_are_refused(ws):
    root = ws.workspace
    os.symlink(root.parent / "secret.txt", root / "link.txt")
    os.symlink(root.parent, root / "up")
    (root / "inside.txt").write_text("fine")
    os.symlink(root / "inside.txt", root / "ok_link.txt")
    r = await READ.invoke({"path": "link.txt"}, ws)
    assert (
        r.is_error and "resolves outside the workspace" in r.text and "outside the workspace\n" not in r.text
    )
    r = await WRITE.invoke({"path": "up/secret.txt", "content": "pwned"}, ws)
    assert r.is_error and "resolves outside" in r.text
    r = await LIST.invoke({"path": "up"}, ws)
    assert r.is_error
    assert (root.parent / "secret.txt").read_text() == "outside the workspace"
    assert (await READ.invoke({"path": "ok_link.txt"}, ws)).text == "fine"
    listing = (await LIST.invoke({"recursive": True}, ws)).text
    assert (
        "link.txt -> (link outside the workspace, refused)" in listing and "ok_link.txt -> (link)" in listing
    )
    assert "secret.txt" not in listing


async def test_other_file_errors(ws):
    (ws.workspace / "bin.dat").write_bytes(b"\x00\x01\x02" * 10)
    (ws.workspace / "d").mkdir()
    cases = [
        (READ, {"path": "nope.txt"}, "file not found: nope.txt"),
        (READ, {"path": "bin.dat"}, "binary file (30 bytes)"),
        (READ, {"path": "d"}, "is not a file"),
        (WRITE, {"path": "d", "content": "x"}, "is a directory"),
        (LIST, {"path": "bin.dat"}, "is not a folder"),
        (LIST, {"path": "zz"}, "folder not found"),
        (WRITE, {"path": "a.txt"}, "'content'"),
    ]
    for spec, args, needle in cases:
        r = await spec.invoke(args, ws)
        assert r.is_error and needle in r.text, r.text


async def test_os_errors_are_tool_errors(ws):
    locked = ws.workspace / "locked"
    locked.mkdir()
    (locked / "f.txt").write_text("x")
    r = await WRITE.invoke({"path": "n" * 300 + ".txt", "content": "x"}, ws)
    assert r.is_error and "File name too long" in r.text
    if os.geteuid() != 0:  # root ignores permission bits
        locked.chmod(0)
        try:
            r = await READ.invoke({"path": "locked/f.txt"}, ws)
            assert r.is_error and "Permission denied" in r.text
        finally:
            locked.chmod(0o755)
