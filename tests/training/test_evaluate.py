"""Held-out turn metrics on a checkpoint from the pipeline (an untrained one: the counts add up, nothing
is credited by accident)."""

from __future__ import annotations

from training.evaluate import _answer, evaluate


def test_turn_metrics_add_up(init_dir):
    m = evaluate(init_dir, n=2, families=("arith", "lookup"), max_new_tokens=24)
    assert m["turns"] == 4 and m["call_turns"] == 2 and m["final_turns"] == 2
    assert m["right_calls"] <= m["right_tools"] <= m["call_turns"]
    assert m["right_answer"] == 0  # 24 random tokens do not write "Answer: <n>"
    assert 0 <= m["well_formed_rate"] <= 1


def test_answer_line():
    assert _answer("I think.\nAnswer: 42") == "42"
    assert _answer("answer: 7 ") == "7"
    assert _answer("no answer here") is None
