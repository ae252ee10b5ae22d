"""The coding suite: generated deterministically, every task red as shipped and green with its reference
patch, and the loop's mechanics end to end under `advisor eval` (edit -> red -> consult -> green)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from advisor.evals.coding import KINDS, build, build_suite
from advisor.tools.commands import bwrap_problem

from advisor.cli import main
from advisor.testing import Reply, ScriptedServer, ScriptedToolCall

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "evals" / "suites" / "coding"
TASKS = sorted(p.name for p in (SUITE / "tasks").iterdir())
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def test_shipped_suite_is_the_generators_output(tmp_path):
    build_suite(tmp_path / "coding")
    shipped = sorted(p.relative_to(SUITE).as_posix() for p in SUITE.rglob("*") if p.is_file())
    made = sorted(
        p.relative_to(tmp_path / "coding").as_posix() for p in (tmp_path / "coding").rglob("*") if p.is_file()
    )
    assert shipped == made
    for rel in made:
        assert (SUITE / rel).read_bytes() == (tmp_path / "coding" / rel).read_bytes(), rel
    assert len(TASKS) >= 24 and {t.rsplit("-", 1)[0] for t in TASKS} == set(KINDS)
    for t in (t for t in TASKS if t.startswith(("units", "dispatch"))):  # bugs across two modules
        repo = SUITE / "tasks" / t / "repo"
        modules = [p for p in repo.glob("*/*.py") if p.parent.name != "tests" and p.name != "__init__.py"]
        assert len(modules) == 2
        tested = {
            line.split()[1]
            for f in (repo / "tests").iterdir()
            for line in f.read_text().splitlines()
            if line.startswith("from ")
        }
        (mod,) = (p for p in modules if f"{p.parent.name}.{p.stem}" in tested)
        (other,) = (p for p in modules if p != mod)
        assert (
            f"from {other.parent.name}.{other.stem} import" in mod.read_text()
        )  # the tested module uses the other


@pytest.mark.parametrize("name", TASKS)
def test_task_is_red_and_its_reference_patch_makes_it_green(tmp_path, name):
    task_dir = SUITE / "tasks" / name
    task = yaml.safe_load((task_dir / "task.yaml").read_text())
    assert task["workspace"] == {"from": "repo"} and task["check"]["type"] == "command"
    repo = tmp_path / "repo"
    shutil.copytree(task_dir / "repo", repo)
    red = subprocess.run(PYTEST, cwd=repo, capture_output=True, text=True, timeout=120)
    assert red.returncode == 1 and "failed" in red.stdout, red.stdout
    subprocess.run(
        ["git", "apply", "-p1", str(task_dir / "reference.patch")], cwd=repo, check=True, timeout=60
    )
    green = subprocess.run(PYTEST, cwd=repo, capture_output=True, text=True, timeout=120)
    assert green.returncode == 0, green.stdout
    tests_after = {p.name: p.read_text() for p in (repo / "tests").iterdir() if p.is_file()}
    assert tests_after == {
        p.name: p.read_text() for p in (task_dir / "repo" / "tests").iterdir()
    }  # tests untouched


PICKED = ["window-000", "leap-001", "dispatch-000"]  # off-by-one, a wrong branch, a bug across two files


def _fixes() -> dict[str, tuple[str, str, str, str]]:
    """Task -> (test file text that identifies it, path, buggy text, fixed text)."""
    out = {}
    for name in PICKED:
        kind, seed = name.rsplit("-", 1)
        _, bug = build(kind, int(seed))
        test = next(v for k, v in bug.files.items() if k.startswith("tests/"))
        ((path, fixed),) = bug.fixed.items()
        out[name] = (test, path, bug.files[path], fixed)
    return out


FIXES = _fixes()


def executor(body: dict) -> Reply:
    """Reads the tests, runs them (red), answers too early (the check is red), and after the frontier's
    advice applies the fix and answers again (green). Without advice it never fixes anything."""
    msgs = body["messages"]
    tool_texts = [m["content"] for m in msgs if m["role"] == "tool"]
    seen = json.dumps(msgs)
    if not tool_texts:
        return Reply(
            tool_calls=[
                ScriptedToolCall(
                    "shell", {"command": "cat tests/*.py; python -m pytest -q -p no:cacheprovider"}
                )
            ]
        )
    if "ADVICE" not in seen or any(t.startswith("replaced in") for t in tool_texts):
        return Reply(text="Answer: DONE")
    name = next(n for n, (test, *_rest) in FIXES.items() if test.strip() in tool_texts[0])
    _, path, old, new = FIXES[name]
    return Reply(tool_calls=[ScriptedToolCall("edit_file", {"path": path, "old_text": old, "new_text": new})])


def test_eval_mechanics_red_consult_green(tmp_path):
    sandbox = "bwrap" if bwrap_problem() is None else "limits"
    with ScriptedServer(
        {
            "flash": executor,
            "frontier": lambda body: Reply(text="ADVICE: read the failing assertion; fix the package."),
        }
    ) as server:
        shipped = yaml.safe_load((SUITE / "suite.yaml").read_text())
        suite = {
            "name": "coding-picked",
            "tasks": [str(SUITE / "tasks" / n / "task.yaml") for n in PICKED],
            "defaults": {**shipped["defaults"], "shell": {"sandbox": sandbox}},
            "endpoints": {
                "flash": server.endpoint_config(
                    "flash", price={"input": 0.2, "cached_input": 0.04, "output": 1.15}
                ).model_dump(exclude_none=True),
                "frontier": server.endpoint_config(
                    "frontier", price={"input": 5, "cached_input": 0.5, "output": 25}
                ).model_dump(exclude_none=True),
            },
        }
        (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
        out = tmp_path / "out"
        rc = main(
            [
                "eval",
                str(tmp_path / "suite.yaml"),
                "--strategies",
                "executor,advisor",
                "--out",
                str(out),
                "--quiet",
                "--concurrency",
                "3",
            ]
        )
    assert rc == 0
    for name in PICKED:
        adv = json.loads((out / "advisor" / name / "result.json").read_text())
        alone = json.loads((out / "executor" / name / "result.json").read_text())
        assert adv["outcome"] == "passed" and adv["consults"] >= 1, (name, adv["error"])
        assert alone["outcome"] == "failed" and alone["workspace_diff"] in (None, "")
        assert adv["workspace_diff"] == (SUITE / "tasks" / name / "reference.patch").read_text()
        events = [
            json.loads(line) for line in (out / "advisor" / name / "trace.jsonl").read_text().splitlines()
        ]
        kinds = [e["type"] for e in events if e["type"] in ("tool_result", "check", "consult")]
        # red tests (the shell run), a red check, the consult, the edit, a green check
        assert kinds == ["tool_result", "check", "consult", "tool_result", "check"], (name, kinds)
        checks = [e["passed"] for e in events if e["type"] == "check"]
        assert checks == [False, True]
    res = json.loads((out / "results.json").read_text())
    assert res["stats"]["advisor"]["solved"] == 3 and res["stats"]["executor"]["solved"] == 0
