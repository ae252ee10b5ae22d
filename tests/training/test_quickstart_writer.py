"""`training.quickstart` writes any scripted family's task into the Quickstart's task.yaml form: goal,
tools, input images and files, and the check value, the template's roles and escalation kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from advisor import load_task
from training.quickstart import candidate, write


@pytest.mark.parametrize("family", ["evals.arithmetic", "evals.lookup", "evals.marks"])
def test_a_written_candidate_loads_with_its_inputs(tmp_path: Path, family: str):
    task = candidate(0, family)
    loaded = load_task(write(task, tmp_path), check_env=False)
    assert loaded.goal.strip() == task.goal.strip() and loaded.check.value == task.answer
    assert [t.name for t in loaded.tool_specs()] == task.tools
    assert sorted(p.name for p in loaded.input_paths("images")) == sorted(task.images)
    assert sorted(p.name for p in loaded.input_paths("files")) == sorted(task.files)
    assert all(p.is_file() for kind in ("images", "files") for p in loaded.input_paths(kind))
    assert loaded.escalation.mode == "restart"  # the template's policy, kept
