"""Write the offline Quickstart task: one the shipped executor gets wrong alone and the pair solves with a
consult.

The Quickstart must show Advisor Mode earning its keep, so its task is picked, openly, as the first of a
seeded stream of tasks of one family (default: the eval suite's `arithmetic`, an exact computation through
the python tool; seeds from 500 000, far from the training and held-out streams) on which, greedy and
deterministic on this CPU, `advisor run --strategy executor` fails and `advisor run` (the task's escalation
policy) passes with at least one consult. It writes the task's goal, files and check value into
`examples/quickstart/task.yaml`, keeping the rest of that file (comments, roles, escalation, budget).

    python -m training.quickstart              # search, then write examples/quickstart/
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
from pathlib import Path

from advisor import Advisor, load_task
from training.tasks import EVAL_FAMILIES, GENERATORS, ScriptedTask, from_eval_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quickstart"
PAIR = ROOT / "models" / "embedded-pair.yaml"  # the candidates run on the shipped pair
SEED_BASE = 500_000


def candidate(i: int, family: str = "evals.arithmetic") -> ScriptedTask:
    if family in GENERATORS:
        return GENERATORS[family](random.Random(SEED_BASE + i), i)
    return from_eval_spec(family, SEED_BASE + i)


def task_yaml(task: ScriptedTask, template: str) -> str:
    """`template` (the Quickstart's task.yaml) with this task's goal, input images and files, tools and check
    value; comments, roles, escalation and budget kept."""
    goal = "goal: |\n" + "".join(f"  {line}\n" for line in task.goal.strip().splitlines())
    text = re.sub(r"^goal: \|\n(?:  .*\n)+", lambda _: goal, template, count=1, flags=re.M)
    kinds = [(kind, names) for kind, names in (("images", task.images), ("files", task.files)) if names]
    inputs = "".join(f"  {kind}: [{', '.join(sorted(names))}]\n" for kind, names in kinds)
    inputs = "inputs:\n" + inputs if inputs else ""
    text = re.sub(r"^inputs:\n(?:  .*\n)*", lambda _: inputs, text, count=1, flags=re.M)
    if inputs and "\ninputs:" not in text:
        text = text.replace("\ntools:", "\n" + inputs.rstrip("\n") + "\ntools:", 1)
    text = re.sub(r"^tools: .*\n", lambda _: f"tools: [{', '.join(task.tools)}]\n", text, count=1, flags=re.M)
    head = text[: text.index("\ncheck:") + 1]  # the check is the file's last key
    return head + f'check: {{type: equals, value: "{task.answer}"}}\n'


def write(task: ScriptedTask, folder: Path, endpoints: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in task.files.items():
        (folder / name).write_text(body, encoding="utf-8")
    for name, data in task.images.items():
        (folder / name).write_bytes(data)
    template = (EXAMPLE / "task.yaml").read_text(encoding="utf-8")
    (folder / "task.yaml").write_text(task_yaml(task, template), encoding="utf-8")
    if endpoints:
        (folder / "advisor.yaml").write_text(PAIR.read_text(encoding="utf-8"), encoding="utf-8")
    return folder / "task.yaml"


async def search(n: int, work: Path, family: str) -> int | None:
    async with Advisor(runs_dir=work / "runs", fsync=False) as adv:
        for i in range(n):
            task = load_task(write(candidate(i, family), work / f"{family}-{i}"))
            alone = await adv.run(task, "executor", work / "runs" / f"{i}-executor")
            if alone.outcome == "passed":
                print(f"candidate {i}: the executor alone passes", file=sys.stderr)
                continue
            pair = await adv.run(task, "advisor", work / "runs" / f"{i}-advisor")
            print(
                f"candidate {i}: executor alone {alone.outcome}; advisor {pair.outcome} "
                f"with {pair.consults} consult(s)",
                file=sys.stderr,
            )
            if pair.outcome == "passed" and pair.consults:
                return i
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=40, help="candidates to try")
    p.add_argument("--work", type=Path, default=Path("build/quickstart-search"))
    p.add_argument("--family", default="evals.arithmetic", choices=[*GENERATORS, *EVAL_FAMILIES])
    a = p.parse_args(argv)
    found = asyncio.run(search(a.n, a.work, a.family))
    if found is None:
        print(f"training.quickstart: none of {a.n} candidates shows a rescue", file=sys.stderr)
        return 1
    task = candidate(found, a.family)
    for old in EXAMPLE.glob("*"):  # the previous pick's input files
        if old.suffix in (".txt", ".csv", ".json", ".png") and old.name not in {*task.files, *task.images}:
            old.unlink()
    write(task, EXAMPLE, endpoints=False)
    print(
        f"examples/quickstart: {a.family} candidate {found} (seed {SEED_BASE + found}), answer {task.answer}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
