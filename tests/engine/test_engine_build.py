"""`python -m advisor.engine.build` (the README's set-up step) and the content-addressed build folder of the CPU
decode ops: built once per source, torch and Python, shared by every clone, announced before a compile."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from advisor.engine.model import cpu_decode

ROOT = Path(__file__).resolve().parents[2]


def test_the_build_folder_is_named_for_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int f() { return 1; }\n")
    b.write_text("int f() { return 2; }\n")
    assert cpu_decode.build_directory(a) == cpu_decode.build_directory(a)
    assert cpu_decode.build_directory(a) != cpu_decode.build_directory(b)
    assert cpu_decode.build_directory(a).parent == tmp_path
    assert re.fullmatch(r"advisor_cpu_decode-[0-9a-f]{16}", cpu_decode.build_directory(a).name)
    # a second clone's copy of the same source shares the folder
    clone = tmp_path / "clone" / "a.cpp"
    clone.parent.mkdir()
    clone.write_text(a.read_text())
    assert cpu_decode.build_directory(clone) == cpu_decode.build_directory(a)
    # another environment with the same torch shares it (a fresh venv does not compile again); another
    # torch release builds elsewhere
    import torch

    here = cpu_decode.build_directory(a)
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    assert cpu_decode.build_directory(a) == here
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".post1")
    assert cpu_decode.build_directory(a) != here


def test_a_compile_is_announced_on_one_line_and_an_import_is_not(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    source = tmp_path / "ops.cpp"
    source.write_text("int f() { return 1; }\n")
    calls = []

    def fake_load(name, sources, build_directory, **kw):
        calls.append((name, sources, build_directory))
        (Path(build_directory) / f"{name}.so").write_text("")
        return "module"

    monkeypatch.setattr("torch.utils.cpp_extension.load", fake_load)
    monkeypatch.setattr(cpu_decode, "_toolchain_problem", lambda probe=True: None)
    monkeypatch.setattr(cpu_decode, "_import", lambda name, library: "module" if library.is_file() else None)
    with caplog.at_level(logging.INFO, logger=cpu_decode.__name__):
        assert not cpu_decode.is_built(source, "t")
        assert cpu_decode._build(source, "t") == "module"
        assert cpu_decode.is_built(source, "t")
        assert cpu_decode._build(source, "t") == "module"
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "compiling the CPU decode ops" in notes[0] and "advisor.engine.build" in notes[0]
    # built from the copy in the build folder, so paths are the same whichever clone builds; once built, a
    # load imports the library without asking the build tool
    d = cpu_decode.build_directory(source, "t")
    assert calls == [("t", [str(d / "ops.cpp")], str(d))]
    assert (d / "ops.cpp").read_text() == source.read_text()


TINY = """#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""

LOAD = """
import sys
from pathlib import Path
from advisor.engine.model import cpu_decode
print(cpu_decode._build(Path(sys.argv[1]), sys.argv[2], sys.argv[3]).answer())
"""


@pytest.mark.skipif(cpu_decode._toolchain_problem() is not None, reason="no C++ toolchain here")
def test_a_built_library_loads_under_another_path_without_a_rebuild(tmp_path):
    # what a user's shell does: `.venv/bin/advisor` once, then a bare `advisor` after activating, with a
    # different ninja (or none, or a broken one) first on PATH
    source, build = tmp_path / "tiny.cpp", tmp_path / "build"
    source.write_text(TINY)
    build.mkdir()
    assert cpu_decode._build(source, "advisor_test_path", str(build)).answer() == 42
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("ninja", "c++", "g++", "cc"):  # any build would run one of these and leave its mark
        (tools / tool).write_text(f"#!/bin/sh\ntouch {tmp_path}/ran-{tool}\nexit 1\n")
        (tools / tool).chmod(0o755)
    built = {p.name: p.stat().st_mtime_ns for p in build.iterdir()}
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(source), "advisor_test_path", str(build)],
        env={**os.environ, "PATH": f"{tools}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"
    assert "compiling" not in done.stderr
    assert not list(tmp_path.glob("ran-*"))
    assert {p.name: p.stat().st_mtime_ns for p in build.iterdir()} == built


def test_a_build_finds_the_environments_own_ninja_when_path_has_none(tmp_path, monkeypatch):
    pytest.importorskip("ninja")
    import shutil

    cxx = shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setenv("PATH", str(tmp_path))  # neither the venv's bin folder nor a system ninja
    monkeypatch.setenv("CXX", cxx)
    assert cpu_decode._toolchain_problem(probe=False) == "ninja not found"
    with cpu_decode._venv_ninja():
        assert cpu_decode._toolchain_problem(probe=False) is None
    assert os.environ["PATH"] == str(tmp_path)


def _engine_build(**env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "advisor.engine.build"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.skipif(cpu_decode.ops() is None, reason="no C++ toolchain here: the ops are not built")
def test_engine_build_says_the_ops_are_built():
    done = _engine_build()  # this process has loaded them already: the step is a check
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip() == f"advisor.engine.build: CPU decode ops already built in {cpu_decode.build_directory()}"
    )


def test_engine_build_without_the_ops_is_not_a_set_up_failure():
    done = _engine_build(ADVISOR_CPU_OPS="0")
    assert done.returncode == 0, done.stderr
    assert "not built" in done.stdout and "PyTorch path" in done.stdout


def test_the_readme_set_up_and_ci_build_the_ops():
    readme = (ROOT / "README.md").read_text()
    setup = re.search(r"```bash\n(python3 -m venv[^\n]*)\n", readme).group(1)
    assert setup.endswith("&& .venv/bin/python -m advisor.engine.build")
    assert setup in (ROOT / ".ci" / "run").read_text()
