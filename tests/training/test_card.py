"""A continued run's card gives every run's command and one loss curve over all of them."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

from training.card import main as card_main
from training.runlog import TrainConfig, TrainLog, earlier_runs

DATA = {
    "tasks": 5,
    "families": ["arith"],
    "samples": 9,
    "sequences": 6,
    "tokens": 5000,
    "target_tokens": 400,
    "mean_len": 833.3,
    "vocab_size": 700,
}


def _run(init_dir, folder, steps, **config):
    shutil.copytree(init_dir, folder)
    log = TrainLog(
        config=asdict(TrainConfig(tasks=5, families=("arith",), **config)),
        params=123,
        data=DATA,
        steps=steps,
        loss=[1.0 / s for s in steps],
        drill_steps=steps[:1],
        drill_loss=[2.0],
        wall_s=float(len(steps)),
    )
    (folder / "train_log.json").write_text(json.dumps(asdict(log)), encoding="utf-8")
    return folder


def test_a_continued_runs_card_gives_every_run_and_one_curve(init_dir, tmp_path):
    first = _run(init_dir, tmp_path / "first", [10, 20], lr=0.002)
    second = _run(init_dir, tmp_path / "second", [10], lr=0.001, init=str(first))
    # a log from before `earlier` was kept: the chain is followed through the --init paths
    assert [r["config"]["lr"] for r in earlier_runs(second)] == [0.002, 0.001]
    third = _run(init_dir, tmp_path / "third", [10, 20, 30], lr=0.0005, init=str(second), drill_warmup=0)

    assert card_main([str(third)]) == 0
    card = (third / "README.md").read_text(encoding="utf-8")
    assert "In 3 runs" in card and card.count("```\n   python -m training.train") == 3
    assert "--init <checkpoint of run 1>" in card and "--init <checkpoint of run 2>" in card
    assert "/first" not in card and "/second" not in card  # no machine-local paths
    assert "--lr 0.0005" in card and "20 steps, 2 s wall" in card and "30 steps, 3 s wall" in card
    assert (third / "loss.png").stat().st_size > 1000
    kept = json.loads((third / "train_log.json").read_text(encoding="utf-8"))
    assert [r["wall_s"] for r in kept["earlier"]] == [2.0, 1.0]

    # the held-out agent table that training.heldout wrote into the card survives a rewrite
    from training.heldout import write_into

    write_into(third / "README.md", "| strategy | the table |")
    assert card_main([str(third)]) == 0
    again = (third / "README.md").read_text(encoding="utf-8")
    assert again.count("| strategy | the table |") == 1 and again.startswith("# step-nano\n")

    missing = tmp_path / "none"
    missing.mkdir()
    try:
        card_main([str(missing)])
    except SystemExit as e:
        assert "no train_log.json" in str(e)
    else:
        raise AssertionError("a folder without train_log.json must be refused")
