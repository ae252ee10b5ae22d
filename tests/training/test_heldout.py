"""The held-out table written into the model cards, from an `advisor eval` results.json."""

from training.heldout import BEGIN, END, table, write_into


def _results():
    def st(solved, tasks, usd, consults=0.0):
        return {
            "tasks": tasks,
            "solved": solved,
            "success_rate": solved / tasks,
            "usd_per_task": usd,
            "usd_per_solved": usd * tasks / solved if solved else None,
            "consults_per_task": consults,
        }

    per_task = {
        "arithmetic-1000": {"executor": {"outcome": "passed"}, "frontier": {"outcome": "passed"},
                            "advisor": {"outcome": "passed"}},
        "lookup-1000": {"executor": {"outcome": "failed"}, "frontier": {"outcome": "passed"},
                        "advisor": {"outcome": "passed"}},
    }  # fmt: skip
    return {
        "stats": {"executor": st(1, 2, 0.001), "frontier": st(2, 2, 0.03), "advisor": st(2, 2, 0.008, 0.5)},
        "per_task": per_task,
        "headline": {"advisor": {"success_rate": 1.0, "frontier_success_rate": 1.0, "success_delta": 0.0,
                                 "cost_per_solved_ratio": 0.2667, "cost_per_task_ratio": 0.2667}},
    }  # fmt: skip


def test_table_rows_and_families():
    md = table(_results(), "cmd", {"mode": "restart", "takeover_steps": 2})
    assert (
        "The advisor's escalation (evals/suites/embedded-pair.defaults.yaml): `{mode: restart, takeover_steps: 2}`"
        in md
    )
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| strategy | solved | success | arithmetic | lookup |")
    assert rows[1] == "| executor | 1/2 | 50.0% | 1/1 | 0/1 | $0.00100 | $0.00200 | 0.00 |"
    assert rows[3] == "| advisor | 2/2 | 100.0% | 1/1 | 1/1 | $0.00800 | $0.00800 | 0.50 |"
    assert "at 0.27x the frontier-only cost per solved task" in md
    assert "weaker frontier" not in md
    assert "the executor alone failed (rescues): 1." in md  # lookup-1000


def test_a_frontier_weaker_than_the_executor_is_said_so():
    r = _results()
    r["stats"]["frontier"]["success_rate"] = 0.25
    assert "Here the frontier stand-in solves no more than the executor alone (25.0% against 50.0%)" in table(
        r, "cmd"
    )


def test_write_into_replaces_its_block(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# m\n\nbody\n")
    write_into(card, "first")
    write_into(card, "second")
    text = card.read_text()
    assert text.count(BEGIN) == text.count(END) == 1 and "second" in text and "first" not in text
    assert text.startswith("# m\n\nbody\n")
