"""Suites: a folder of task files (its own *.yaml / *.yml, and */task.yaml below it), a suite.yaml (tasks + shared endpoints, defaults, strategies), or JSONL.

suite.yaml:

    name: basic
    endpoints: {flash: {...}, frontier: {...}}   # shared; a task's own endpoints win
    defaults:                                     # merged under every task (a task's own keys win)
      executor: {endpoint: flash}
      frontier: {endpoint: frontier, effort: high}
      escalation: {after_failures: 2, at: [replan]}
    tasks: [tasks/*/task.yaml, more.jsonl]        # task files, globs, or JSONL files (relative to suite.yaml)
    timeout_s: 300                                # per task (default: the task's budget.max_wall_s + 30)
    strategies:                                   # named strategies: a base strategy + escalation overrides
      advisor-takeover: {base: advisor, escalation: {mode: takeover, takeover_steps: 2}}

JSONL: one {"prompt": ..., "answer": ...[, "images": [paths], "name": ...]} a line; each becomes a task
whose goal is the prompt and whose check is `equals` the answer (defaults supply the rest; a bare .jsonl
given as SUITE runs with executor endpoint `flash` and frontier endpoint `frontier`).
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from advisor.runner import STRATEGIES
from advisor.task import (
    Escalation,
    Task,
    TaskError,
    one_line_error,
    read_endpoints,
    read_yaml,
    user_config_dir,
)

# a bare .jsonl suite has no defaults block: its tasks use the endpoint names the shipped suites use
JSONL_ROLES = {"executor": {"endpoint": "flash"}, "frontier": {"endpoint": "frontier", "effort": "high"}}


class StrategySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="advisor | executor | frontier")
    escalation: dict[str, Any] = Field(default_factory=dict, description="overrides of the task's escalation")


class SuiteFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    endpoints: dict[str, Any] = Field(default_factory=dict)
    defaults: dict[str, Any] = Field(default_factory=dict)
    tasks: list[str] = Field(min_length=1)
    timeout_s: float | None = Field(default=None, gt=0)
    strategies: dict[str, StrategySpec] = Field(default_factory=dict)


@dataclass
class Suite:
    name: str
    source: str
    tasks: list[Task]
    strategies: dict[str, StrategySpec] = field(default_factory=dict)
    timeout_s: float | None = None
    found: str = ""  # for a folder: which task files it held ("found 3 task files (...)")

    def strategy(self, name: str) -> StrategySpec:
        """The spec for a strategy name: a built-in one, or one named in suite.yaml."""
        if name in self.strategies:
            return self.strategies[name]
        if name in STRATEGIES:
            return StrategySpec(base=name)
        known = ", ".join(list(STRATEGIES) + list(self.strategies))
        raise TaskError(f"{self.source}: unknown strategy '{name}' (known: {known})")

    def task_for(self, task: Task, strategy: str) -> Task:
        """`task` as run under `strategy`: escalation overrides applied."""
        spec = self.strategy(strategy)
        if not spec.escalation:
            return task
        try:
            esc = Escalation.model_validate({**task.escalation.model_dump(), **spec.escalation})
        except ValidationError as e:
            raise TaskError(
                one_line_error(self.source, e, prefix=f"strategies.{strategy}.escalation")
            ) from None
        return task.model_copy(update={"escalation": esc}).with_base(task.base_dir, task.source)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(data: dict, path: Path, source: str, defaults: dict, endpoints: dict, check_env: bool) -> Task:
    beside = {k: v.model_dump() for k, v in read_endpoints(path.parent / "advisor.yaml").items()}
    data = _merge(defaults, data)
    own = data.get("endpoints") or {}
    if not isinstance(own, dict):
        raise TaskError(f"{source}: endpoints: must be a mapping of name -> endpoint")
    data["endpoints"] = {**endpoints, **beside, **own}
    try:
        task = Task.model_validate(data)
    except ValidationError as e:
        raise TaskError(one_line_error(source, e)) from None
    task.with_base(path.parent.resolve(), source)
    task.validate_ready(check_env=check_env, strategies=())
    return task


def load_jsonl(path: Path, defaults: dict, endpoints: dict, check_env: bool = True) -> list[Task]:
    tasks = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TaskError(f"{path}: cannot read: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}: line {n}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
            raise TaskError(f'{path}: line {n}: each line needs {{"prompt": ..., "answer": ...}}')
        data: dict[str, Any] = {
            "name": str(row.get("name") or f"{path.stem}-{n}"),
            "goal": row["prompt"],
            "check": {**defaults.get("check", {}), "type": "equals", "value": str(row["answer"])},
        }
        if row.get("images"):
            data["inputs"] = {"images": list(row["images"])}
        tasks.append(_build(data, path, f"{path}:{n}", defaults, endpoints, check_env))
    return tasks


def _common_endpoints(extra: Path | None) -> dict:
    eps = {k: v.model_dump() for k, v in read_endpoints(user_config_dir() / "advisor.yaml").items()}
    if extra is not None:
        if not extra.is_file():
            raise TaskError(f"{extra}: endpoints file not found")
        eps.update({k: v.model_dump() for k, v in read_endpoints(extra).items()})
    return eps


def load_suite(path: str | Path, *, endpoints_file: Path | None = None, check_env: bool = True) -> Suite:
    """Loads a suite; `TaskError` (one line) on bad input. `endpoints_file`: an advisor.yaml whose
    endpoints every task gets (below the suite's and the task's own)."""
    path = Path(path)
    common = _common_endpoints(endpoints_file)
    if path.is_dir() and (path / "suite.yaml").is_file():
        path = path / "suite.yaml"
    if path.is_dir():
        loose, nested = _task_files(path)
        if not loose and not nested:
            raise TaskError(
                f"{path}: no tasks found: looked for a suite.yaml, *.yaml / *.yml task files in it "
                "and */task.yaml below it"
            )
        tasks = [_build(_task_data(f, f.stem), f, str(f), {}, common, check_env) for f in loose]
        tasks += [_build(_task_data(f, f.parent.name), f, str(f), {}, common, check_env) for f in nested]
        found = (
            [
                f"{len(loose)} task file{'s' * (len(loose) != 1)} ({', '.join(f.name for f in loose[:4])}"
                f"{', ...' if len(loose) > 4 else ''})"
            ]
            if loose
            else []
        )
        found += [f"{len(nested)} */task.yaml"] if nested else []
        suite = Suite(path.name, str(path), tasks, found="found " + " and ".join(found))
    elif path.suffix == ".jsonl":
        suite = Suite(path.stem, str(path), load_jsonl(path, dict(JSONL_ROLES), common, check_env))
    elif path.is_file():
        suite = _load_suite_yaml(path, common, check_env)
    else:
        raise TaskError(f"{path}: suite not found (a folder of task files, a suite.yaml or a .jsonl)")
    names = [t.name for t in suite.tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TaskError(
            f"{suite.source}: duplicate task names: {', '.join(dupes)} (names are output folders)"
        )
    for name, spec in suite.strategies.items():
        if spec.base not in STRATEGIES:
            raise TaskError(
                f"{suite.source}: strategies.{name}.base: unknown '{spec.base}' (known: {', '.join(STRATEGIES)})"
            )
    return suite


# YAML files in a suite folder that are not tasks: endpoint configs (advisor.yaml, advisor.hosted.yaml)
NOT_TASKS = ("advisor.",)


def _task_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """A folder's task files: its own *.yaml / *.yml (not advisor*.yaml), and task.yaml in folders below."""
    loose = sorted(
        f
        for f in folder.iterdir()
        if f.is_file() and f.suffix in (".yaml", ".yml") and not f.name.startswith(NOT_TASKS)
    )
    nested = sorted(f for f in folder.rglob("task.yaml") if f.parent != folder)
    return loose, nested


def _task_data(path: Path, default_name: str | None = None) -> dict:
    """A task file's mapping; without a `name`, `default_name` (its file or folder name) names it."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise TaskError(f"{path}: a task file must be a YAML mapping (name, goal, executor, ...)")
    if default_name is not None and "name" not in data:
        data = {"name": default_name, **data}
    return data


def _load_suite_yaml(path: Path, common: dict, check_env: bool) -> Suite:
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a suite file must be a YAML mapping (tasks, endpoints, defaults, ...)")
    try:
        sf = SuiteFile.model_validate(raw)
    except ValidationError as e:
        raise TaskError(one_line_error(path, e)) from None
    endpoints = {**common, **sf.endpoints}
    tasks: list[Task] = []
    for i, entry in enumerate(sf.tasks):
        matches = sorted(glob.glob(str(path.parent / entry), recursive=True))
        if not matches:
            raise TaskError(f"{path}: tasks[{i}]: nothing matches '{entry}' (relative to the suite file)")
        for m in map(Path, matches):
            if m.suffix == ".jsonl":
                tasks += load_jsonl(m, sf.defaults, endpoints, check_env)
            else:
                tasks.append(_build(_task_data(m), m, str(m), sf.defaults, endpoints, check_env))
    return Suite(sf.name or path.parent.name, str(path), tasks, sf.strategies, sf.timeout_s)
