"""Task families with verifiable answers and a scripted solution, for training traces.

Each generated `ScriptedTask` carries what the Advisor loop would get (name, goal, workspace files, tool
names) plus a solution script: the turns a good executor takes (reasoning, tool calls), with the final
answer computed by the generator. The tool *results* are not scripted: `training.traces` runs the real
tools on a real workspace to get them.

Own families: `arith` (arithmetic through the python tool), `lookup` (a value read from a workspace
file), `order` (read two files, then compute a discounted total with python: the Quickstart's shape).

The eval suite's families (`advisor.evals.families`: arithmetic, lookup, multistep, marks; named here
`evals.arithmetic`, ...) are scripted too (`from_eval_spec`), so the executor can train on the distribution
it is evaluated on. Training draws their seeds from `EVAL_SEED_BASE * (seed + 1) + i`, far from the small
seeds the shipped suites use. `marks` is the image family: the model counts the dots with the
`find_regions` tool, whose text result it reads; the image itself reaches these text-only models as its
name and size (`vision: false` on their endpoints). `vision` is left out: reading a label off pixels needs
a trained vision tower, and the tiny models' towers are untrained.

Tool-call turns carry no reasoning: the loop sends earlier turns back without it, so a whole task's turns
are one training sequence (`training.traces.packed`). The final turn keeps a one-line reasoning.
`with_recovery` plays a task the way the loop goes on after a wrong answer (check rejected, optionally a
frontier takeover), so both models learn to re-read the context and answer right.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

FAMILIES = ("arith", "lookup", "order")


@dataclass
class Call:
    name: str
    arguments: dict[str, Any]


@dataclass
class Turn:
    """One assistant turn: reasoning, then tool calls, or (no calls) the final content.

    `train=False` marks a turn that is in the history but never a target (the wrong answer of a recovery
    trace). `after` holds loop messages (prompt template, arguments) the loop adds after the turn.
    `answer_from_tool` makes the content "Answer: " + the last line the last tool call printed (a wrong
    attempt's answer, known only once its code has run), unless that is the task's answer.
    """

    reasoning: str
    calls: list[Call] = field(default_factory=list)
    content: str = ""
    train: bool = True
    after: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    answer_from_tool: bool = False


@dataclass
class ScriptedTask:
    family: str
    name: str
    goal: str
    answer: str
    tools: list[str]
    files: dict[str, str] = field(default_factory=dict)
    turns: list[Turn] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)  # input images: name -> PNG bytes


ITEMS = (
    "apples bananas bolts brushes cables candles chairs clips cups desks drills envelopes fans files "
    "forks gloves hammers hooks jars keys knives lamps magnets markers mugs nails notebooks nuts pads "
    "pens pencils plates pliers ropes rulers saws screws sheets shelves spoons staples tapes tiles "
    "towels trays tubes valves washers wires"
).split()
OPS = ("+", "-", "*")


def _arith(rng: random.Random, i: int) -> ScriptedTask:
    n = rng.randint(2, 4)
    nums = [rng.randint(2, 999) for _ in range(n)]
    ops = [rng.choice(OPS) for _ in range(n - 1)]
    expr = str(nums[0]) + "".join(f" {o} {x}" for o, x in zip(ops, nums[1:], strict=True))
    value = eval(expr)  # noqa: S307 - digits and + - * only, built above
    phrasing = rng.choice(
        (
            "Compute {e}. Use the python tool for the arithmetic. Answer with the number only.",
            "What is {e}? Calculate it with python and answer with the number only.",
            "Evaluate the expression {e} using the python tool. Give just the result.",
        )
    )
    code = f"print({expr})"
    return ScriptedTask(
        family="arith",
        name=f"arith-{i}",
        goal=phrasing.format(e=expr),
        answer=str(value),
        tools=["python"],
        turns=[
            Turn("", [Call("python", {"code": code})]),
            Turn(f"The program printed {value}.", content=f"Answer: {value}"),
        ],
    )


def _inventory(rng: random.Random, k: int) -> dict[str, int]:
    return {item: rng.randint(0, 500) for item in rng.sample(ITEMS, k)}


def _lookup(rng: random.Random, i: int) -> ScriptedTask:
    stock = _inventory(rng, rng.randint(4, 9))
    target = rng.choice(list(stock))
    fname = rng.choice(("inventory.csv", "stock.csv", "counts.csv"))
    body = "item,count\n" + "".join(f"{k},{v}\n" for k, v in stock.items())
    goal = rng.choice(
        (
            "Your workspace holds {f}. How many {t} are in stock? Answer with the number only.",
            "Read {f} and report the count for {t}. Answer with the number only.",
        )
    ).format(f=fname, t=target)
    return ScriptedTask(
        family="lookup",
        name=f"lookup-{i}",
        goal=goal,
        answer=str(stock[target]),
        tools=["read_file", "list_files", "python"],
        files={fname: body},
        turns=[
            Turn("", [Call("read_file", {"path": fname})]),
            Turn(f"The row for {target} says {stock[target]}.", content=f"Answer: {stock[target]}"),
        ],
    )


def _order(rng: random.Random, i: int) -> ScriptedTask:
    prices = {item: round(rng.uniform(0.2, 40.0), 2) for item in rng.sample(ITEMS, rng.randint(4, 7))}
    lines = {item: rng.randint(1, 30) for item in rng.sample(list(prices), rng.randint(2, 4))}
    discount = rng.choice((0, 5, 10, 15, 20, 25))
    price_csv = "item,unit_price_usd\n" + "".join(f"{k},{v:.2f}\n" for k, v in prices.items())
    order_txt = "Order\n" + "".join(f"- {n} x {k}\n" for k, n in lines.items())
    order_txt += f"Discount: {discount}% off the total\n" if discount else "No discount.\n"
    terms = " + ".join(f"{n} * {prices[k]:.2f}" for k, n in lines.items())
    code = f"total = {terms}\ntotal = total * (1 - {discount} / 100)\nprint(f'{{total:.2f}}')"
    total = sum(n * prices[k] for k, n in lines.items()) * (1 - discount / 100)
    answer = f"{total:.2f}"
    return ScriptedTask(
        family="order",
        name=f"order-{i}",
        goal=(
            "Your workspace holds order.txt (an order) and prices.csv (unit prices).\n"
            "Compute the order's total in USD after the discount it states. Use the tools to read the files\n"
            "and the python tool for the arithmetic. Answer with the number only, rounded to 2 decimals."
        ),
        answer=answer,
        tools=["read_file", "list_files", "python"],
        files={"prices.csv": price_csv, "order.txt": order_txt},
        turns=[
            Turn(
                "",
                [Call("read_file", {"path": "order.txt"}), Call("read_file", {"path": "prices.csv"})],
            ),
            Turn(
                "",
                [Call("python", {"code": code})],
            ),
            Turn(f"The total is {answer}.", content=f"Answer: {answer}"),
        ],
    )


GENERATORS: dict[str, Callable[[random.Random, int], ScriptedTask]] = {
    "arith": _arith,
    "lookup": _lookup,
    "order": _order,
}

# ------------------------------------------------------------------------------ the eval suite's families
EVAL_FAMILIES = ("evals.arithmetic", "evals.lookup", "evals.multistep", "evals.marks")
EVAL_SEED_BASE = 10_000
_COMPUTE = re.compile(r"Compute (.+?) exactly")
_FIELD = re.compile(r"What is the (\w+) of the item named '([^']+)'")
# One program for every multistep task: the model learns to write it, not to do sums; the cents arithmetic
# is the generator's own, so the printed total is the expected answer to the cent.
MULTISTEP_CODE = """import csv, json
prices = {r["sku"]: r["price"] for r in csv.DictReader(open("prices.csv"))}
order = json.load(open("order.json"))
cents = sum(round(float(prices[ln["sku"]]) * 100) * ln["qty"] for ln in order["lines"])
print(f"{cents * (100 - order['discount_percent']) / 100 / 100:.2f}")"""


def from_eval_spec(family: str, seed: int) -> ScriptedTask:
    """An `advisor.evals.families` task with a scripted solution (the eval's own goal, files, tools and answer)."""
    from advisor.evals.families import spec

    family = family.removeprefix("evals.")
    s = spec(family, seed)
    files = {name: data.decode("utf-8") for name, data in s.files.items()}
    if family == "arithmetic":
        m = _COMPUTE.search(s.goal)
        if m is None:
            raise ValueError(f"{s.name}: no expression in the goal {s.goal!r}")
        turns = [
            Turn(
                "",
                [Call("python", {"code": f"print({m.group(1)})"})],
            ),
            Turn(f"The program printed {s.answer}.", content=f"Answer: {s.answer}"),
        ]
    elif family == "lookup":
        m = _FIELD.search(s.goal)
        if m is None:
            raise ValueError(f"{s.name}: no field and item in the goal {s.goal!r}")
        (fname,) = files
        turns = [
            Turn("", [Call("read_file", {"path": fname})]),
            Turn(f"The row for {m.group(2)} has {m.group(1)} {s.answer}.", content=f"Answer: {s.answer}"),
        ]
    elif family == "multistep":
        turns = [
            Turn("", [Call("read_file", {"path": "order.json"})]),
            Turn(
                "",
                [Call("python", {"code": MULTISTEP_CODE})],
            ),
            Turn(f"The total is {s.answer}.", content=f"Answer: {s.answer}"),
        ]
    elif family == "marks":
        turns = [
            Turn("", [Call("find_regions", {"image": "img_0", "kind": "elements", "draw": False})]),
            Turn(f"find_regions found {s.answer} coloured marks.", content=f"Answer: {s.answer}"),
        ]
    else:
        raise ValueError(f"family {family!r} cannot be scripted here (scripted: {', '.join(EVAL_FAMILIES)})")
    images = dict(s.images)
    return ScriptedTask(f"evals.{family}", s.name, s.goal, s.answer, list(s.tools), files, turns, images)


def _near_miss(answer: str, rng: random.Random) -> str:
    """A wrong answer of the kind a small model writes: one digit of the right one changed."""
    digits = [i for i, ch in enumerate(answer) if ch.isdigit()]
    i = rng.choice(digits)
    wrong = rng.choice([d for d in "0123456789" if d != answer[i]])
    return answer[:i] + wrong + answer[i + 1 :]


def _miscopied(turn: Turn, rng: random.Random, source: str) -> Turn | None:
    """The turn with one digit changed in one python call's code, in a number the program copied from
    `source` (the goal and the files), as a small model miscopies it (None: no such number)."""
    spots = []
    for j, c in enumerate(turn.calls):
        code = c.arguments.get("code", "") if c.name == "python" else ""
        for m in re.finditer(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", code):
            if re.search(rf"(?<![\d.]){re.escape(m[0])}(?![\d])", source):
                spots += [(j, i) for i in range(m.start(), m.end()) if code[i].isdigit()]
    if not spots:
        return None
    j, i = rng.choice(spots)
    code = turn.calls[j].arguments["code"]
    leading = i + 1 < len(code) and code[i + 1].isdigit() and (i == 0 or not code[i - 1].isdigit())
    digits = (
        [d for d in "123456789" if d != code[i]] if leading else [d for d in "0123456789" if d != code[i]]
    )
    code = code[:i] + rng.choice(digits) + code[i + 1 :]  # no leading zero: 05 is a SyntaxError
    calls = list(turn.calls)
    calls[j] = Call("python", {**calls[j].arguments, "code": code})
    return replace(turn, calls=calls, train=False)


def with_recovery(task: ScriptedTask, rng: random.Random, takeover: bool, redo: bool = False) -> ScriptedTask:
    """The task as the loop plays it after a wrong answer: the check rejects it (and, with `takeover`, the
    frontier takes the next step), then the right answer. The wrong answer is history only, never a target;
    the right one is read again from the tool results in the context.

    With `redo` (and a python call with a digit in it), the wrong answer comes from a wrong program: the
    attempt's last python call has one digit changed in a number it copied from the goal or the files, and
    its answer is what that program printed. After the rejection the task's own calls run again (the
    targets: copy the numbers anew), then the right answer. The whole attempt is history only."""
    *work, final = task.turns
    wrong = _near_miss(task.answer, rng)
    after: list[tuple[str, dict[str, Any]]] = [("check_rejected", {"answer": wrong})]
    if takeover:
        after.append(("takeover", {"steps": 1, "trigger": "failures"}))
    bad = Turn("", content=f"Answer: {wrong}", train=False, after=after)
    turns, kind = [*work, bad, final], "recovery"
    with_code = [k for k, t in enumerate(work) if any(c.name == "python" for c in t.calls)]
    source = "\n".join([task.goal, *task.files.values()])
    if redo and with_code and (miss := _miscopied(work[with_code[-1]], rng, source)) is not None:
        attempt = [replace(t, train=False) for t in work]
        attempt[with_code[-1]] = miss
        # what the miscopied program prints (the near miss stays if it happens to print the right answer)
        bad = replace(bad, answer_from_tool=True)
        turns, kind = [*attempt, bad, *work, final], "redo"
    return ScriptedTask(
        task.family,
        f"{task.name}-{kind}",
        task.goal,
        task.answer,
        task.tools,
        task.files,
        turns,
        task.images,
    )


def generate(
    n: int, seed: int, families: tuple[str, ...] = FAMILIES, recovery_every: int = 0, redo_every: int = 0
) -> Iterator[ScriptedTask]:
    """`n` tasks, families in rotation, fully determined by `seed` (own and eval-suite families may mix).

    With `recovery_every=k`, every k-th task is played as a recovery (`with_recovery`), alternately with and
    without a takeover message; with `redo_every=r` as well, every r-th pair of recoveries (one with, one
    without a takeover) comes from a wrong program and runs the calls again."""
    unknown = [f for f in families if f not in GENERATORS and f not in EVAL_FAMILIES]
    if unknown:
        known = ", ".join([*GENERATORS, *EVAL_FAMILIES])
        raise ValueError(f"unknown task families {unknown}; known: {known}")
    rng = random.Random(seed)
    for i in range(n):
        family = families[i % len(families)]
        if family in GENERATORS:
            task = GENERATORS[family](rng, i)
        else:
            task = from_eval_spec(family, EVAL_SEED_BASE * (seed + 1) + i)
        if recovery_every and i % recovery_every == recovery_every - 1:
            # its own stream, so turning recovery on leaves the other tasks as they were
            r = i // recovery_every
            task = with_recovery(
                task,
                random.Random(f"{seed}-recovery-{i}"),
                takeover=r % 2 == 0,
                redo=bool(redo_every) and (r // 2) % redo_every == 0,
            )
        yield task
