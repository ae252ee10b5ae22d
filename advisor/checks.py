"""Answer checks: equals, contains, regex, python (a function beside the task), command, none."""

from __future__ import annotations

import asyncio
import importlib.util
import re
from dataclasses import dataclass, replace
from pathlib import Path

from advisor.task import Check, Shell
from advisor.tools.commands import SandboxUnavailable, format_result, run_command

CHECK_OUTPUT_CHARS = 4000  # of a command check's output, what goes back to the executor

_FINAL = re.compile(r"(?:final answer|answer)\s*[:：]\s*(.+)", re.IGNORECASE | re.DOTALL)


@dataclass
class CheckResult:
    passed: bool
    detail: str


def extract_answer(text: str) -> str:
    """The answer in a final message: what follows 'Answer:' when present, else the whole text."""
    text = text.strip()
    matches = list(_FINAL.finditer(text))
    if matches:
        text = matches[-1].group(1).strip()
    return text.strip().strip("`").strip()


def _number(s: str) -> float | None:
    try:
        return float(s.replace(",", "").removeprefix("$"))
    except ValueError:
        return None


def _norm(s: str, ignore_case: bool) -> str:
    s = s.strip().strip("\"'").rstrip(".").strip()
    return s.lower() if ignore_case else s


async def run_check(
    check: Check, answer: str, base_dir: Path, workspace: Path | None = None, shell: Shell | None = None
) -> CheckResult:
    if check.type == "none":
        return CheckResult(True, "no check")
    if check.type == "command":
        return await _command_check(check, workspace, shell or Shell())
    if check.type == "python":
        return await asyncio.to_thread(_python_check, check, answer, base_dir)
    expected = check.value or ""
    if check.type == "equals":
        a, b = _norm(answer, check.ignore_case), _norm(expected, check.ignore_case)
        na, nb = _number(a), _number(b)
        ok = a == b or (na is not None and nb is not None and abs(na - nb) <= 1e-9 * max(1.0, abs(nb)))
        return CheckResult(ok, f"expected {expected!r}, got {answer!r}")
    if check.type == "contains":
        a, b = (answer.lower(), expected.lower()) if check.ignore_case else (answer, expected)
        return CheckResult(b in a, f"expected to contain {expected!r}")
    flags = re.IGNORECASE if check.ignore_case else 0
    return CheckResult(re.search(expected, answer, flags) is not None, f"expected to match /{expected}/")


def _python_check(check: Check, answer: str, base_dir: Path) -> CheckResult:
    path = base_dir / (check.file or "")
    spec = importlib.util.spec_from_file_location(f"advisor_check_{path.stem}", path)
    if spec is None or spec.loader is None:
        return CheckResult(False, f"cannot load check file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        fn = getattr(module, check.function)
        out = fn(answer)
    except Exception as e:  # the user's check failing is a failed check, not a crash of the run
        return CheckResult(False, f"check {path.name}:{check.function} raised {type(e).__name__}: {e}")
    if isinstance(out, tuple):
        return CheckResult(bool(out[0]), str(out[1]) if len(out) > 1 else "")
    return CheckResult(bool(out), f"{path.name}:{check.function}")


async def _command_check(check: Check, workspace: Path | None, shell: Shell) -> CheckResult:
    """Runs `check.run` in the workspace under the task's sandbox (it executes what the agent left
    there, so it is confined like the agent's own commands); exit 0 passes."""
    if workspace is None:
        return CheckResult(False, "a command check needs the task's workspace")
    limits = replace(
        shell.limits(check.timeout_s), max_output_chars=min(CHECK_OUTPUT_CHARS, shell.max_output_chars)
    )
    try:
        r = await run_command(check.run or "", workspace, sandbox=shell.sandbox, limits=limits)  # type: ignore[arg-type]
    except SandboxUnavailable as e:  # never run unconfined instead: the check fails, saying why
        return CheckResult(False, f"$ {check.run}\nnot run: {e}")
    return CheckResult(r.ok, f"$ {check.run}\n{format_result(r, limits)}")
