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
    # another environment's torch (its include paths are in the build commands) builds elsewhere
    import torch

    here = cpu_decode.build_directory(a)
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
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
    with caplog.at_level(logging.INFO, logger=cpu_decode.__name__):
        assert not cpu_decode.is_built(source, "t")
        assert cpu_decode._build(source, "t") == "module"
        assert cpu_decode.is_built(source, "t")
        assert cpu_decode._build(source, "t") == "module"
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "compiling the CPU decode ops" in notes[0] and "advisor.engine.build" in notes[0]
    # built from the copy in the build folder, so paths are the same whichever clone builds
    d = cpu_decode.build_directory(source, "t")
    assert calls == [("t", [str(d / "ops.cpp")], str(d))] * 2
    assert (d / "ops.cpp").read_text() == source.read_text()


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
