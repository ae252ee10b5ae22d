"""Write the offline Quickstart task: an order-total job the shipped executor gets wrong alone and the
pair solves with a consult.

The Quickstart must show Advisor Mode earning its keep, so its order is picked, openly, as the first of a
seeded stream of `order` tasks (the `training.tasks` family with the Quickstart's goal; seeds from 500 000,
far from the training and held-out streams) on which, greedy and deterministic on this CPU,
`advisor run --strategy executor` fails and `advisor run` (the task's takeover policy) passes with at
least one consult. It writes `prices.csv`, `order.txt` and the check value into `examples/quickstart/`.
Candidates run on `models/embedded-pair.yaml` and take their policy from the Quickstart's task.yaml, so run
it where that file carries the pair's takeover policy: the branch `wip/offline-quickstart` (main's
task.yaml is the hosted one).

    python -m training.quickstart              # search, then write examples/quickstart/
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from pathlib import Path

from advisor import Advisor, load_task
from training.tasks import GENERATORS, ScriptedTask

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quickstart"
PAIR = ROOT / "models" / "embedded-pair.yaml"  # the candidates run on the shipped pair
SEED_BASE = 500_000


def candidate(i: int) -> ScriptedTask:
    return GENERATORS["order"](random.Random(SEED_BASE + i), i)


def task_yaml(answer: str) -> str:
    """The Quickstart's task.yaml (comments and layout kept) with this order's check value."""
    text = (EXAMPLE / "task.yaml").read_text(encoding="utf-8")
    head = text[: text.index("\ncheck:") + 1]  # the check is the file's last key
    return head + f'check: {{type: equals, value: "{answer}"}}\n'


def write(task: ScriptedTask, folder: Path, endpoints: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in task.files.items():
        (folder / name).write_text(body, encoding="utf-8")
    (folder / "task.yaml").write_text(task_yaml(task.answer), encoding="utf-8")
    if endpoints:
        (folder / "advisor.yaml").write_text(PAIR.read_text(encoding="utf-8"), encoding="utf-8")
    return folder / "task.yaml"


async def search(n: int, work: Path) -> int | None:
    async with Advisor(runs_dir=work / "runs", fsync=False) as adv:
        for i in range(n):
            task = load_task(write(candidate(i), work / f"order-{i}"))
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
    a = p.parse_args(argv)
    found = asyncio.run(search(a.n, a.work))
    if found is None:
        print(f"training.quickstart: none of {a.n} candidates shows a rescue", file=sys.stderr)
        return 1
    task = candidate(found)
    write(task, EXAMPLE, endpoints=False)
    print(f"examples/quickstart: candidate {found} (seed {SEED_BASE + found}), answer {task.answer}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
