"""Building the CPU decode ops: a machine without a toolchain falls back to the PyTorch path with one log
line; a toolchain that works but fails on the source is a bug, logged as an error or raised when strict."""

from __future__ import annotations

import logging

import pytest
from advisor.engine.model import cpu_decode

needs_toolchain = pytest.mark.skipif(
    cpu_decode._toolchain_problem() is not None, reason="no C++ toolchain here: nothing to fail to compile"
)

BROKEN = "// a typo in our own source\nint main() { return undeclared_name; }\n"


def test_the_tests_run_strict():
    import os

    assert os.environ.get("ADVISOR_CPU_OPS_STRICT") == "1"  # tests/conftest.py


def test_a_missing_compiler_falls_back_quietly_with_one_line(tmp_path, monkeypatch, caplog):
    source = tmp_path / "ops.cpp"
    source.write_text(BROKEN)  # never reached: the compiler is not there
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with caplog.at_level(logging.INFO, logger=cpu_decode.__name__):
        assert (
            cpu_decode._build(source, "advisor_test_no_compiler", str(tmp_path)) is None
        )  # strict: no raise
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert warnings[0].getMessage() == (
        f"engine: CPU decode ops unavailable (no C++ compiler: {tmp_path / 'no-such-c++'} not found); "
        "using the PyTorch path"
    )


def test_a_compiler_that_cannot_build_anything_is_a_missing_toolchain(tmp_path, monkeypatch, caplog):
    source = tmp_path / "ops.cpp"
    source.write_text(BROKEN)
    monkeypatch.setenv("CXX", "false")  # on PATH, so torch's build runs and fails; then the probe fails too
    with caplog.at_level(logging.INFO, logger=cpu_decode.__name__):
        assert (
            cpu_decode._build(source, "advisor_test_false_compiler", str(tmp_path)) is None
        )  # strict: no raise
    ours = [r for r in caplog.records if r.name == cpu_decode.__name__ and r.levelno >= logging.WARNING]
    assert [(r.levelno, r.getMessage()) for r in ours] == [
        (
            logging.WARNING,
            "engine: CPU decode ops unavailable (false cannot build an OpenMP program "
            "(CalledProcessError)); using the PyTorch path",
        )
    ]


def test_missing_ninja_is_a_missing_toolchain(monkeypatch):
    monkeypatch.setattr("torch.utils.cpp_extension.is_ninja_available", lambda: False)
    assert cpu_decode._toolchain_problem() == "ninja not found"


@needs_toolchain
def test_a_compile_error_in_our_source_raises_under_strict(tmp_path):
    source = tmp_path / "ops.cpp"
    source.write_text(BROKEN)
    with pytest.raises(cpu_decode.CpuOpsBuildError, match="undeclared_name") as err:
        cpu_decode._build(source, "advisor_test_broken_strict", str(tmp_path))
    assert str(source) in str(err.value)


@needs_toolchain
def test_a_compile_error_in_our_source_is_logged_as_an_error_outside_tests(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("ADVISOR_CPU_OPS_STRICT")
    source = tmp_path / "ops.cpp"
    source.write_text(BROKEN)
    with caplog.at_level(logging.WARNING, logger=cpu_decode.__name__):
        assert cpu_decode._build(source, "advisor_test_broken_lenient", str(tmp_path)) is None
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert str(source) in record.getMessage() and "undeclared_name" in record.getMessage()


@needs_toolchain
def test_the_shipped_source_builds():
    # strict here: a compile error in cpu_decode.cpp raises instead of leaving the PyTorch path to run
    assert cpu_decode.ops() is not None
