"""Unit tests: aggregation and break-even math, suites and the JSONL loader, families, harness errors."""

import asyncio
import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from advisor.evals import families
from advisor.evals.aggregate import aggregate, break_even, percentile
from advisor.evals.harness import run_suite
from advisor.evals.plots import pareto
from advisor.evals.records import TaskRecord
from advisor.evals.suite import load_suite
from PIL import Image

import advisor  # noqa: F401  (import order: advisor before tools)
from advisor.result import TaskResult
from advisor.task import TaskError

ROOT = Path(__file__).resolve().parents[2]
ZERO = {"input": 0, "cached_input": 0, "cache_write": 0, "output": 0, "reasoning": 0}


def rec(strategy, task, outcome, usd, wall=1.0, consults=0, exec_in=0):
    return TaskRecord(
        strategy,
        task,
        outcome,
        steps=2,
        consults=consults,
        wall_s=wall,
        tokens={"executor": {**ZERO, "input": exec_in}, "frontier": dict(ZERO)},
        cost={"executor": usd, "frontier": 0.0, "total": usd, "frontier_only_estimate": 10 * usd},
    )


def test_percentile_matches_linear_interpolation():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([4.0, 1.0, 2.0, 3.0], 50) == 2.5
    assert percentile(list(map(float, range(1, 21))), 95) == pytest.approx(19.05)


def test_aggregate_per_strategy_headline_and_break_even():
    recs = [
        rec("frontier", "a", "passed", 0.10, wall=2.0),
        rec("frontier", "b", "passed", 0.30, wall=4.0),
        rec("advisor", "a", "passed", 0.02, consults=1, exec_in=100),
        rec("advisor", "b", "failed", 0.04, exec_in=50),
        rec("executor", "a", "error", 0.01),
        rec("executor", "b", "failed", 0.01),
    ]
    res = aggregate(recs)
    assert res["strategies"] == ["executor", "frontier", "advisor"]
    fr, ad, ex = res["stats"]["frontier"], res["stats"]["advisor"], res["stats"]["executor"]
    assert (fr["tasks"], fr["solved"], fr["success_rate"]) == (2, 2, 1.0)
    assert fr["total_usd"] == pytest.approx(0.40) and fr["usd_per_task"] == pytest.approx(0.20)
    assert fr["usd_per_solved"] == pytest.approx(0.20) and fr["latency_s"]["median"] == 3.0
    assert ad["usd_per_solved"] == pytest.approx(0.06) and ad["consults_per_task"] == 0.5
    assert ad["tokens"]["executor"]["input"] == 150
    assert ex["usd_per_solved"] is None and ex["outcomes"] == {"error": 1, "failed": 1}
    h = res["headline"]["advisor"]
    assert h["cost_per_solved_ratio"] == pytest.approx(0.06 / 0.20)
    assert h["success_delta"] == pytest.approx(-0.5)
    assert h["cost_per_task_ratio"] == pytest.approx(0.03 / 0.20)
    assert "executor" not in res["headline"]
    be = res["break_even"]
    assert be["advisor"]["monthly_usd"] == pytest.approx({"1000": 30.0, "10000": 300.0, "100000": 3000.0})
    assert be["advisor"]["monthly_savings_vs_frontier_usd"]["1000"] == pytest.approx(170.0)
    assert "monthly_savings_vs_frontier_usd" not in be["frontier"]
    assert res["per_task"]["b"]["advisor"] == {
        "outcome": "failed",
        "cost_usd": 0.04,
        "consults": 0,
        "steps": 2,
    }


def test_break_even_without_frontier_and_pareto():
    be = break_even({"executor": {"usd_per_task": 0.002}}, volumes=(1000,))
    assert be == {"executor": {"usd_per_task": 0.002, "monthly_usd": {"1000": 2.0}}}
    pts = {"executor": (0.01, 50.0), "advisor": (0.05, 90.0), "frontier": (0.5, 90.0), "bad": (0.6, 10.0)}
    assert pareto(pts) == ["executor", "advisor"]


def test_families_are_seeded_and_answers_verify(tmp_path):
    for fam in families.FAMILIES:
        a, b = families.generate(fam, 3, tmp_path / "a"), families.generate(fam, 3, tmp_path / "b")
        for f in a.iterdir():
            assert f.read_bytes() == (b / f.name).read_bytes()
    assert families.spec("arithmetic", 1).answer != families.spec("arithmetic", 2).answer
    s = families.spec("lookup", 5)
    rows = list(csv.DictReader(io.StringIO(s.files["inventory.csv"].decode())))
    name = s.goal.split("'")[1]
    field = "price" if "price of" in s.goal else "stock"
    assert next(r[field] for r in rows if r["name"] == name) == s.answer
    m = families.spec("multistep", 4)
    prices = {
        r["sku"]: float(r["price"]) for r in csv.DictReader(io.StringIO(m.files["prices.csv"].decode()))
    }
    order = json.loads(m.files["order.json"])
    total = sum(prices[ln["sku"]] * ln["qty"] for ln in order["lines"]) * (
        1 - order["discount_percent"] / 100
    )
    assert float(m.answer) == pytest.approx(total, abs=0.005)
    with pytest.raises(KeyError, match="unknown family"):
        families.spec("poetry", 1)


def test_suite_of_chosen_families_with_defaults_and_effort(tmp_path):
    """The held-out suite for the embedded pair: three families, the pair's defaults, effort low for both."""
    defaults = yaml.safe_load((ROOT / "evals/suites/embedded-pair.defaults.yaml").read_text())
    assert (
        families.main(
            [
                str(tmp_path / "s"),
                "--families",
                "arithmetic,lookup",
                "--per-family",
                "2",
                "--first-seed",
                "1000",
                "--effort",
                "low",
                "--defaults",
                str(ROOT / "evals/suites/embedded-pair.defaults.yaml"),
            ]
        )
        == 0
    )
    suite = yaml.safe_load((tmp_path / "s/suite.yaml").read_text())
    assert suite["defaults"] == defaults and defaults["escalation"]["mode"] == "restart"
    names = sorted(p.name for p in (tmp_path / "s/tasks").iterdir())
    assert names == ["arithmetic-1000", "arithmetic-1001", "lookup-1000", "lookup-1001"]
    task = yaml.safe_load((tmp_path / "s/tasks/lookup-1001/task.yaml").read_text())
    assert task["executor"]["effort"] == task["frontier"]["effort"] == "low"
    assert task["check"]["value"] == families.spec("lookup", 1001).answer
    assert families.main([str(tmp_path / "t"), "--families", "poetry"]) == 2
    assert families.main([str(tmp_path / "t"), "--defaults", str(tmp_path / "missing.yaml")]) == 2


def test_vision_count_matches_red_blobs():
    import cv2
    import numpy as np

    s = families.spec("vision", 7)
    img = cv2.imdecode(np.frombuffer(s.images["image.png"], np.uint8), cv2.IMREAD_COLOR)
    red = ((img[:, :, 2] > 180) & (img[:, :, 1] < 80) & (img[:, :, 0] < 80)).astype(np.uint8)
    n, _ = cv2.connectedComponents(red)
    assert n - 1 == int(s.answer)


def test_marks_answer_is_what_the_mark_finder_counts():
    """The marks family is solvable through find_regions alone: its count is the answer on every seed
    tried (independently: the coloured pixels' connected components agree too)."""
    import cv2
    import numpy as np
    from advisor.tools.vision import find_regions

    for seed in range(0, 400, 10):
        s = families.spec("marks", seed)
        assert s.tools == ["find_regions"]
        img = Image.open(io.BytesIO(s.images["image.png"]))
        assert len(find_regions(img, "elements", 30)) == int(s.answer)
        hsv = cv2.cvtColor(np.asarray(img.convert("RGB")), cv2.COLOR_RGB2HSV)
        n, _ = cv2.connectedComponents((hsv[..., 1] > 70).astype(np.uint8))
        assert n - 1 == int(s.answer)


def test_shipped_suite_loads(tmp_path):
    eps = {
        "endpoints": {
            "flash": {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "free": True},
            "frontier": {
                "provider": "openai",
                "base_url": "http://127.0.0.1:9/v1",
                "model": "f",
                "free": True,
            },
        }
    }
    (tmp_path / "advisor.yaml").write_text(yaml.safe_dump(eps))
    suite = load_suite(ROOT / "evals/suites/basic", endpoints_file=tmp_path / "advisor.yaml")
    assert len(suite.tasks) >= 30
    assert {t.name.split("-")[0] for t in suite.tasks} == set(families.FAMILIES)
    assert all(t.check.type == "equals" and t.check.value for t in suite.tasks)
    assert all(t.escalation.at == ["replan"] for t in suite.tasks)  # suite defaults applied
    t = suite.task_for(suite.tasks[0], "advisor-takeover")
    assert t.escalation.mode == "takeover" and suite.tasks[0].escalation.mode == "advise"
    assert t.base_dir == suite.tasks[0].base_dir


def test_suite_errors_are_one_line(tmp_path):
    with pytest.raises(TaskError, match="suite not found"):
        load_suite(tmp_path / "nope")
    (tmp_path / "s.jsonl").write_text('{"prompt": "p"}\n')
    with pytest.raises(TaskError, match=r"s\.jsonl: line 1: each line needs"):
        load_suite(tmp_path / "s.jsonl")
    (tmp_path / "suite.yaml").write_text("tasks: [x.jsonl, y.jsonl]\n")
    with pytest.raises(TaskError, match=r"tasks\[0\]: nothing matches 'x.jsonl'"):
        load_suite(tmp_path / "suite.yaml")


def _jsonl_suite(tmp_path: Path, rows: list[dict]) -> Path:
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ep = {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "free": True}
    suite = {
        "tasks": ["t.jsonl"],
        "endpoints": {"flash": ep},
        "defaults": {"executor": {"endpoint": "flash"}},
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    return tmp_path / "suite.yaml"


def test_jsonl_duplicates_rejected(tmp_path):
    path = _jsonl_suite(
        tmp_path, [{"name": "a", "prompt": "p", "answer": 1}, {"name": "a", "prompt": "q", "answer": 2}]
    )
    with pytest.raises(TaskError, match="duplicate task names: a"):
        load_suite(path)


def test_harness_records_errors_and_timeouts_and_goes_on(tmp_path):
    suite = load_suite(
        _jsonl_suite(tmp_path, [{"name": n, "prompt": "p", "answer": 1} for n in ("ok", "boom", "slow")])
    )

    async def run_fn(task, base, out):
        if task.name == "boom":
            raise RuntimeError("endpoint exploded\nsecond line")
        if task.name == "slow":  # spends, then hangs: the timeout must keep what was spent
            call = {
                "seq": 1,
                "type": "model_call",
                "role": "executor",
                "cost_usd": 0.25,
                "usage": {"input": 7},
            }
            (out / "trace.jsonl").write_text(
                json.dumps({"seq": 0, "type": "task_start"}) + "\n" + json.dumps(call) + "\n"
            )
            await asyncio.sleep(30)
        r = TaskResult(task.name, base, "passed", answer="1", tokens={}, cost_usd={"total": 0.0})
        r.write(out)
        return r

    out = tmp_path / "out"
    run = asyncio.run(run_suite(suite, ["executor"], out, run_fn=run_fn, timeout_s=0.3))
    got = {r.task: r for r in run.ran}
    assert got["ok"].outcome == "passed"
    assert got["boom"].outcome == "error" and got["boom"].error == "RuntimeError: endpoint exploded"
    assert got["slow"].outcome == "error" and "timed out" in got["slow"].error
    assert got["slow"].cost_usd["total"] == 0.25 and got["slow"].tokens["executor"]["input"] == 7
    last = json.loads((out / "executor" / "slow" / "trace.jsonl").read_text().splitlines()[-1])
    assert last["type"] == "task_end" and last["seq"] == 2 and last["outcome"] == "error"
    for n in ("ok", "boom", "slow"):
        assert json.loads((out / "executor" / n / "result.json").read_text())["strategy"] == "executor"
    again = asyncio.run(run_suite(suite, ["executor"], out, run_fn=run_fn, timeout_s=0.3))
    assert again.ran == [] and len(again.skipped) == 3


def test_bare_jsonl_suite_uses_flash_and_frontier(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"prompt": "2+2?", "answer": 4, "images": ["a.png"]}\n')
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    ep = {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "free": True}
    (tmp_path / "advisor.yaml").write_text(yaml.safe_dump({"endpoints": {"flash": ep, "frontier": ep}}))
    (t,) = load_suite(tmp_path / "q.jsonl").tasks
    assert (t.name, t.executor.endpoint, t.frontier.endpoint) == ("q-1", "flash", "frontier")
    assert t.check.value == "4" and t.input_paths("images") == [tmp_path.resolve() / "a.png"]
