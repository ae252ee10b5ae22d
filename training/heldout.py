"""The shipped pair on a held-out suite through `advisor eval`: executor-only, frontier-only and advisor.

Builds a seeded suite of the eval families the models trained on (`advisor.evals.families`: arithmetic, lookup,
multistep, marks; seeds from 1000, far from both the shipped `evals/suites/basic` seeds and the training
seeds 10 000 and up), with the pair's task defaults (`evals/suites/embedded-pair.defaults.yaml`: after one
failed step the conversation restarts from the goal with the frontier's first two steps) and effort low
for both roles, as trained. Runs it with the pair's endpoints (`models/embedded-pair.yaml`: step-nano
priced as Step 3.7 Flash, step-nano-large priced as a frontier model, both text-only), then writes the
table into both model cards.

    python -m training.heldout --per-family 67 --out build/heldout        # 268 tasks x 3 strategies
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import yaml
from advisor.evals.families import build_suite

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("arithmetic", "lookup", "multistep", "marks")
DEFAULTS = ROOT / "evals" / "suites" / "embedded-pair.defaults.yaml"
ENDPOINTS = ROOT / "models" / "embedded-pair.yaml"
CARDS = (ROOT / "models" / "step-nano" / "README.md", ROOT / "models" / "step-nano-large" / "README.md")
BEGIN, END = "<!-- heldout:begin -->", "<!-- heldout:end -->"
STRATEGIES = ("executor", "frontier", "advisor")


def _usd(x: float | None) -> str:
    return "n/a" if x is None else f"${x:.5f}"


def table(results: dict, command: str, policy: dict | None = None) -> str:
    """Markdown: one row per strategy, success per family, and the advisor-versus-frontier headline."""
    stats = results["stats"]
    fams = sorted({name.rsplit("-", 1)[0] for name in results["per_task"]})
    solved: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for name, by in results["per_task"].items():
        fam = name.rsplit("-", 1)[0]
        for strategy, r in by.items():
            cell = solved[strategy][fam]
            cell[0] += r["outcome"] == "passed"
            cell[1] += 1
    head = [
        "strategy",
        "solved",
        "success",
        *fams,
        "USD per task",
        "USD per solved task",
        "consults per task",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in STRATEGIES:
        if s not in stats:
            continue
        st = stats[s]
        per_fam = [f"{solved[s][f][0]}/{solved[s][f][1]}" for f in fams]
        lines.append(
            f"| {s} | {st['solved']}/{st['tasks']} | {st['success_rate']:.1%} | "
            + " | ".join(per_fam)
            + f" | {_usd(st['usd_per_task'])} | {_usd(st['usd_per_solved'])} | {st['consults_per_task']:.2f} |"
        )
    out = [f"`{command}`", ""]
    if policy:  # the advisor row depends on it
        shown = ", ".join(f"{k}: {v}" for k, v in policy.items())
        out += [f"The advisor's escalation ({DEFAULTS.relative_to(ROOT)}): `{{{shown}}}`.", ""]
    out += lines
    h = results.get("headline", {}).get("advisor")
    if h and h.get("cost_per_solved_ratio") is not None:
        out += [
            "",
            f"Advisor: {h['success_rate']:.1%} solved against {h['frontier_success_rate']:.1%} frontier-only "
            f"({100 * h['success_delta']:+.1f} points), at {h['cost_per_solved_ratio']:.2f}x the frontier-only "
            f"cost per solved task ({h['cost_per_task_ratio']:.2f}x per task).",
        ]
    by_task = results["per_task"].values()
    if all("executor" in by and "advisor" in by for by in by_task):
        rescued = sum(
            by["advisor"]["outcome"] == "passed" and by["executor"]["outcome"] != "passed" for by in by_task
        )
        out += ["", f"Tasks the advisor solved that the executor alone failed (rescues): {rescued}."]
    ex, fr = stats.get("executor"), stats.get("frontier")
    if ex and fr and fr["success_rate"] <= ex["success_rate"]:
        out += [
            "",
            f"Here the frontier stand-in solves no more than the executor alone ({fr['success_rate']:.1%} against "
            f"{ex['success_rate']:.1%}): the comparison is with a weaker frontier, not the case Advisor Mode is for.",
        ]
    return "\n".join(out)


def write_into(card: Path, body: str) -> None:
    text = card.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        start, end = text.index(BEGIN), text.index(END) + len(END)
        text = text[:start] + block + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n## Held-out agent results (`advisor eval`)\n\n" + block + "\n"
    card.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("--per-family", type=int, default=67)
    p.add_argument("--first-seed", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("build/heldout"))
    p.add_argument("--concurrency", type=int, default=40)
    p.add_argument("--endpoints", type=Path, default=ENDPOINTS)
    p.add_argument(
        "--strategies", default=",".join(STRATEGIES), help="run these now (the table shows all run)"
    )
    p.add_argument("--no-cards", action="store_true", help="print the table, leave the model cards alone")
    a = p.parse_args(argv)
    defaults = yaml.safe_load(DEFAULTS.read_text(encoding="utf-8"))
    suite = build_suite(a.out / "suite", a.per_family, a.first_seed, FAMILIES, defaults, effort="low")
    runs = a.out / "runs"
    cmd = [
        sys.executable, "-m", "advisor.cli", "eval", str(suite), "--endpoints", str(a.endpoints),
        "--strategies", a.strategies, "--concurrency", str(a.concurrency), "--out", str(runs), "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(cmd, text=True)
    results_file = runs / "results.json"
    if not results_file.is_file():
        print(
            f"training.heldout: advisor eval wrote no {results_file} (exit {proc.returncode})",
            file=sys.stderr,
        )
        return 1
    shown = (
        f"python -m training.heldout --per-family {a.per_family} --first-seed {a.first_seed}"
        f"  # {a.per_family * len(FAMILIES)} tasks x {len(STRATEGIES)} strategies via advisor eval"
    )
    body = table(json.loads(results_file.read_text(encoding="utf-8")), shown, defaults.get("escalation"))
    print(body)
    if not a.no_cards:
        for card in CARDS:
            if card.is_file():
                write_into(card, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
