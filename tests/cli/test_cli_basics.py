"""The CLI a newcomer meets first: `--version`, money printed with the sign first, `advisor eval DIR` on a
folder of loose task files, the per-strategy table in the terminal, and live lines from the first event."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from advisor.evals.report import render_html, render_md, tables
from advisor.evals.suite import load_suite

from advisor.cli import main, results_table
from advisor.pricing import usd
from advisor.result import TaskResult, render_report
from advisor.task import TaskError
from advisor.testing import Reply, ScriptedServer, ScriptedUsage

FLASH = {"input": 0.20, "cached_input": 0.04, "output": 1.15}
FRONTIER = {"input": 5.0, "cached_input": 0.5, "output": 25.0}


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    done = subprocess.run(
        [sys.executable, "-m", "advisor.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"advisor {version('advisor')}"


@pytest.mark.parametrize(
    "x, text",
    [
        (-0.246, "-$0.2460"),
        (0.246, "$0.2460"),
        (-0.000123, "-$0.000123"),
        (0.0, "$0.000000"),
        (-1234.5, "-$1,234.50"),
        (None, "n/a"),
    ],
)
def test_money_has_the_sign_before_the_dollar(x, text):
    assert usd(x) == text


def _res(saving_frontier_usd: float) -> dict:
    """An aggregate where the advisor costs more per task than the frontier: negative savings."""
    stat = {
        "tasks": 2,
        "solved": 1,
        "success_rate": 0.5,
        "total_usd": 0.5,
        "usd_per_task": 0.25,
        "usd_per_solved": 0.5,
        "consults_per_task": 1.0,
        "latency_s": {"median": 1.0, "p95": 2.0},
        "tokens": {
            r: {"input": 1, "cached_input": 0, "output": 1, "reasoning": 0} for r in ("executor", "frontier")
        },
    }
    fr = {**stat, "usd_per_task": saving_frontier_usd}
    return {
        "strategies": ["frontier", "advisor"],
        "stats": {"frontier": fr, "advisor": stat},
        "per_task": {"t": {"advisor": {"outcome": "failed", "cost_usd": 0.25}}},
        "break_even": {
            "frontier": {
                "usd_per_task": saving_frontier_usd,
                "monthly_usd": {"1000": 1.0, "10000": 1.0, "100000": 1.0},
            },
            "advisor": {
                "usd_per_task": 0.25,
                "monthly_usd": {"1000": 250.0, "10000": 2500.0, "100000": 25000.0},
                "monthly_savings_vs_frontier_usd": {"1000": -0.246, "10000": -2.46, "100000": -24.6},
            },
        },
        "headline": {},
        "consults": [],
        "cost_per_task": {"frontier": [saving_frontier_usd], "advisor": [0.25]},
    }


def test_negative_savings_print_sign_first_in_every_report():
    res = _res(0.004)
    _, rows = tables(res)["break_even"]
    assert "-$0.2460" in rows[1]
    md, html = render_md(res), render_html(res)
    for text in (md, html):
        assert "-$0.2460" in text and "$-" not in text
    # a solved task that cost more than the frontier alone would have (a failed one claims no saving at all)
    r = TaskResult("t", "advisor", "passed", cost_usd={"total": 0.5, "frontier_only_estimate": 0.25})
    assert "(saved -$0.2500)" in render_report(r)
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(results_table([r]))
    assert "-$0.2500" in console.export_text() and "$-" not in console.export_text()


def _task(name: str | None, answer: str, server: ScriptedServer) -> dict:
    t = {
        "goal": f"Task {name or 'unnamed'}: give the number.",
        "executor": {"endpoint": "flash"},
        "frontier": {"endpoint": "frontier"},
        "check": {"type": "equals", "value": answer},
        "budget": {"max_steps": 3, "max_wall_s": 30},
        "endpoints": {
            "flash": {
                "provider": "openai",
                "base_url": server.base_url,
                "model": "flash",
                "price": FLASH,
                "max_retries": 0,
            },
            "frontier": {
                "provider": "openai",
                "base_url": server.base_url,
                "model": "frontier",
                "price": FRONTIER,
                "max_retries": 0,
            },
        },
    }
    if name:
        t["name"] = name
    return t


@pytest.fixture
def server():
    usage = ScriptedUsage(prompt_tokens=100, completion_tokens=10)
    with ScriptedServer(
        {
            "flash": lambda body: Reply(text="Answer: 7", usage=usage),
            "frontier": lambda body: Reply(text="Answer: 7", usage=usage),
        }
    ) as s:
        yield s


def test_eval_dir_takes_loose_task_files_and_says_what_it_found(tmp_path, server, capsys):
    d = tmp_path / "mine"
    (d / "nested").mkdir(parents=True)
    for stem in ("t1", "t2"):
        (d / f"{stem}.yaml").write_text(yaml.safe_dump(_task(None, "7", server)))
    (d / "t3.yml").write_text(yaml.safe_dump(_task("third", "8", server)))
    (d / "nested" / "task.yaml").write_text(yaml.safe_dump(_task(None, "7", server)))
    (d / "advisor.yaml").write_text("endpoints: {}\n")  # endpoints beside the tasks, not a task
    suite = load_suite(d)
    assert sorted(t.name for t in suite.tasks) == ["nested", "t1", "t2", "third"]
    assert suite.found == "found 3 task files (t1.yaml, t2.yaml, t3.yml) and 1 */task.yaml"

    out = tmp_path / "out"
    assert (
        main(["eval", str(d), "--strategies", "executor,frontier,advisor", "--out", str(out), "--quiet"]) == 0
    )
    printed = capsys.readouterr().out
    assert f"{d}: found 3 task files" in printed
    # the per-strategy table, then the headline under it
    table_at = printed.index("per strategy")
    for col in ("strategy", "success", "USD/task", "USD/solved", "consults/task"):
        assert col in printed[table_at:]
    rows = {line.split("│")[1].strip(): line for line in printed.splitlines() if line.count("│") > 5}
    assert set(rows) >= {"executor", "frontier", "advisor"}
    assert "75.0%" in rows["executor"] and "3" in rows["executor"]  # t3 wants 8: 3 of 4 solved
    assert printed.index("advisor: ") > table_at
    res = json.loads((out / "results.json").read_text())
    assert res["stats"]["executor"]["solved"] == 3


def test_an_empty_folder_names_what_it_looked_for(tmp_path):
    with pytest.raises(TaskError) as err:
        load_suite(tmp_path)
    assert str(err.value) == (
        f"{tmp_path}: no tasks found: looked for a suite.yaml, *.yaml / *.yml task files in it "
        "and */task.yaml below it"
    )


def test_run_prints_a_line_before_the_first_call_and_one_per_step(tmp_path, server):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(_task("quick", "7", server)))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "advisor.cli",
            "run",
            str(tmp_path / "t.yaml"),
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("running 1 task (quick), strategy advisor, outputs in ")
    assert lines[1].startswith("quick: step 1 executor (flash) step: ") and "$0.0000" in lines[1]
    assert lines[2] == "quick: step 1 answer by the executor: 7"
    assert lines[3] == "quick: check passed"
    assert lines[4].startswith("quick: passed after 1 steps, 0 consults, $")
