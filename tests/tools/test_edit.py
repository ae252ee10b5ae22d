"""edit_file, view_file, search and list_files' glob: teaching errors and workspace confinement."""

import pytest
from advisor.tools.registry import BUILTIN
from advisor.tools.spec import ToolContext

EDIT, VIEW, SEARCH, LIST = (BUILTIN[n] for n in ("edit_file", "view_file", "search", "list_files"))

SRC = "def add(a, b):\n    return a - b\n\n\ndef sub(a, b):\n    return a - b\n"


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "calc.py").write_text(SRC)
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "calc.pyc").write_bytes(b"\x00\x01add")
    (root / "README.md").write_text("calc: add and sub\n")
    (tmp_path / "secret.py").write_text("TOKEN = 1\n")
    (root / "link.py").symlink_to(tmp_path / "secret.py")
    return ToolContext(workspace=root)


async def test_replace_unique_snippet(ws):
    r = await EDIT.invoke(
        {
            "path": "pkg/calc.py",
            "old_text": "def add(a, b):\n    return a - b",
            "new_text": "def add(a, b):\n    return a + b",
        },
        ws,
    )
    assert not r.is_error, r.text
    assert r.text.splitlines()[0] == "replaced in pkg/calc.py at line 1 (-2 +2 lines):"
    assert r.text.splitlines()[1:4] == ["1  def add(a, b):", "2      return a + b", "3  "]
    assert (ws.workspace / "pkg/calc.py").read_text().startswith("def add(a, b):\n    return a + b\n")
    assert r.data == {
        "path": "pkg/calc.py",
        "kind": "replace",
        "line": 1,
        "removed_lines": 2,
        "added_lines": 2,
    }


async def test_found_several_times_lists_lines(ws):
    r = await EDIT.invoke({"path": "pkg/calc.py", "old_text": "return a - b", "new_text": "return 0"}, ws)
    assert r.is_error
    assert r.text == (
        "error: old_text found 2 times in pkg/calc.py (lines 2, 6); include more surrounding lines so that it occurs once"
    )
    assert (ws.workspace / "pkg/calc.py").read_text() == SRC


async def test_not_found_names_the_closest_line(ws):
    r = await EDIT.invoke({"path": "pkg/calc.py", "old_text": "def  add(a,b):", "new_text": "x"}, ws)
    assert r.is_error and "old_text not found in pkg/calc.py" in r.text
    assert "the closest line is 1: 'def add(a, b):'" in r.text
    none = await EDIT.invoke({"path": "pkg/calc.py", "old_text": "zzzzqqq", "new_text": "x"}, ws)
    assert none.text == "error: old_text not found in pkg/calc.py; view_file shows the file"


async def test_insert_and_create(ws):
    r = await EDIT.invoke({"path": "pkg/calc.py", "insert_line": 1, "new_text": "import math"}, ws)
    assert not r.is_error and r.data["kind"] == "insert"
    assert (ws.workspace / "pkg/calc.py").read_text().startswith("import math\ndef add")
    end = await EDIT.invoke({"path": "pkg/calc.py", "insert_line": 8, "new_text": "# end\n"}, ws)
    assert not end.is_error and (ws.workspace / "pkg/calc.py").read_text().endswith("return a - b\n# end\n")
    bad = await EDIT.invoke({"path": "pkg/calc.py", "insert_line": 50, "new_text": "x"}, ws)
    assert bad.text == "error: insert_line 50 is out of range: pkg/calc.py has 8 lines (use 1..9; 9 appends)"
    made = await EDIT.invoke({"path": "tests/test_calc.py", "new_text": "def test():\n    pass\n"}, ws)
    assert made.text == "created tests/test_calc.py (2 lines)"
    again = await EDIT.invoke({"path": "tests/test_calc.py", "new_text": "x"}, ws)
    assert again.is_error and "already exists" in again.text
    both = await EDIT.invoke({"path": "README.md", "old_text": "a", "insert_line": 1}, ws)
    assert "not both" in both.text


@pytest.mark.parametrize("path", ["../secret.py", "/etc/passwd", "link.py", "~/x"])
async def test_paths_outside_the_workspace_are_refused(ws, path):
    for tool, args in (
        (EDIT, {"path": path, "old_text": "TOKEN", "new_text": "x"}),
        (VIEW, {"path": path}),
        (SEARCH, {"pattern": "TOKEN", "path": path}),
    ):
        r = await tool.invoke(args, ws)
        assert r.is_error and "refused" in r.text, (tool.name, r.text)
    assert (ws.workspace.parent / "secret.py").read_text() == "TOKEN = 1\n"


async def test_view_file_numbers_and_ranges(ws):
    r = await VIEW.invoke({"path": "pkg/calc.py", "start_line": 5, "end_line": 6}, ws)
    assert r.text == "5  def sub(a, b):\n6      return a - b\n[pkg/calc.py: lines 5-6 of 6]"
    head = await VIEW.invoke({"path": "pkg/calc.py", "end_line": 2}, ws)
    assert head.text.endswith("[pkg/calc.py: lines 1-2 of 6; view more with start_line=3]")
    assert "out of range" in (await VIEW.invoke({"path": "pkg/calc.py", "start_line": 9}, ws)).text
    assert "file not found" in (await VIEW.invoke({"path": "nope.py"}, ws)).text


async def test_search_is_ripgrep_like_and_capped(ws):
    r = await SEARCH.invoke({"pattern": r"return a - b"}, ws)
    assert (
        r.text == "pkg/calc.py:2: return a - b\npkg/calc.py:6: return a - b"
    )  # the .pyc and the link are skipped
    assert r.data["matches"] == 2 and r.data["files"] == 1
    glob = await SEARCH.invoke({"pattern": "add", "glob": "*.md"}, ws)
    assert glob.text == "README.md:1: calc: add and sub"
    (ws.workspace / "many.txt").write_text("hit\n" * 500)
    capped = await SEARCH.invoke({"pattern": "hit", "max_results": 5}, ws)
    assert capped.text.count("\n") == 5 and "495 more matches not shown" in capped.text
    bad = await SEARCH.invoke({"pattern": "add("}, ws)
    assert bad.is_error and "invalid regular expression 'add('" in bad.text
    none = await SEARCH.invoke({"pattern": "nothing_here"}, ws)
    assert not none.is_error and none.text.startswith("no matches")


async def test_list_files_glob(ws):
    r = await LIST.invoke({"pattern": "**/*.py"}, ws)
    assert r.text.splitlines() == ["link.py -> (link outside the workspace, refused)", "pkg/calc.py  66 B"]
    assert (await LIST.invoke({"pattern": "*.md"}, ws)).text == "README.md  18 B"
    assert (await LIST.invoke({"pattern": "*.rs"}, ws)).text == "no files match '*.rs' in ."
    assert "refused" in (await LIST.invoke({"pattern": "../*"}, ws)).text
