"""A checkpoint from the training pipeline runs through the real Advisor loop with provider embedded."""

from __future__ import annotations

import json

from training.agent_check import main


def test_held_out_tasks_run_through_advisor_run(init_dir, tmp_path, capsys):
    assert (
        main([str(init_dir), "--n", "1", "--families", "arith", "--out", str(tmp_path), "--max-steps", "1"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks"] == 1
    (result,) = tmp_path.glob("runs/*/arith-0/result.json")
    r = json.loads(result.read_text())
    # an untrained model: the loop ran one embedded step, billed it at the Flash price, and stopped
    assert r["model_calls"] == 1 and r["outcome"] in ("budget_exceeded", "failed")
    assert r["tokens"] and r["cost_usd"]["total"] > 0
    task = (tmp_path / "tasks" / "arith-0" / "advisor.yaml").read_text()
    assert "provider: embedded" in task and str(init_dir.resolve()) in task
