"""Seeded bug-fix tasks: a small Python package whose tests fail, checked by running pytest.

`generate(kind, seed, root)` writes `root/<kind>-<seed>/` with `task.yaml`, `repo/` (the package and its
tests; the task's workspace is filled from it) and `reference.patch` (the fix, a unified diff applied
with `git apply` in `repo/`; outside the workspace, so the agent never sees it). The same (kind, seed)
always gives the same bytes. Build the shipped suite with `python -m advisor.evals.coding evals/suites/coding`.

Kinds (each a different bug; the seed picks names, values and the data the tests use):
off-by-one (`window`, `pages`, `bisect`), wrong branch (`grade`, `leap`), missing edge case (`mean`,
`chunks`), wrong API use (`words`, `top`, `suffix`, `default`), a bug spanning two files (`units`,
`dispatch`: the tests exercise one module, the bug is in the other).
"""

from __future__ import annotations

import argparse
import difflib
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from textwrap import dedent

import yaml

GOAL = (
    "The tests of the Python package in the workspace fail. Run them (`python -m pytest -q`), find the bug "
    "in the package and fix it; do not change the tests. Answer DONE when all the tests pass."
)
TOOLS = ["shell", "view_file", "search", "edit_file", "list_files"]
CHECK = "python -m pytest -q -p no:cacheprovider"
PACKAGES = [
    "ledger",
    "inventory",
    "metrics",
    "roster",
    "catalog",
    "orders",
    "survey",
    "weather",
    "fleet",
    "library",
]


@dataclass
class Bug:
    files: dict[str, str]  # path -> buggy source (package and tests)
    fixed: dict[str, str]  # path -> fixed source (only files the fix changes)


def _src(text: str) -> str:
    return dedent(text).lstrip("\n")


def window(r: random.Random, pkg: str) -> Bug:
    values = [r.randint(-9, 20) for _ in range(r.randint(6, 9))]
    width = r.randint(2, 4)
    sums = [sum(values[i : i + width]) for i in range(len(values) - width + 1)]
    code = _src(
        '''
        def moving_sums(values, width):
            """Sums of every run of `width` consecutive values, in order."""
            out = []
            for i in range(len(values) - width):
                out.append(sum(values[i : i + width]))
            return out
        '''
    )
    test = _src(
        f"""
        from {pkg}.stats import moving_sums


        def test_moving_sums():
            assert moving_sums({values}, {width}) == {sums}


        def test_whole_list_is_one_window():
            assert moving_sums([1, 2, 3], 3) == [6]
        """
    )
    return Bug(
        {f"{pkg}/__init__.py": "", f"{pkg}/stats.py": code, "tests/test_stats.py": test},
        {f"{pkg}/stats.py": code.replace("len(values) - width)", "len(values) - width + 1)")},
    )


def pages(r: random.Random, pkg: str) -> Bug:
    items = [f"{pkg[:3]}-{i}" for i in range(r.randint(7, 12))]
    size = r.randint(2, 4)
    page = r.randint(2, (len(items) - 1) // size + 1)
    expected = items[(page - 1) * size : page * size]
    code = _src(
        '''
        def page(items, number, size):
            """Page `number` (1 is the first page) of `items`, `size` items a page."""
            start = number * size
            return items[start : start + size]
        '''
    )
    test = _src(
        f"""
        from {pkg}.paging import page

        ITEMS = {items}


        def test_first_page():
            assert page(ITEMS, 1, {size}) == ITEMS[:{size}]


        def test_later_page():
            assert page(ITEMS, {page}, {size}) == {expected}
        """
    )
    return Bug(
        {f"{pkg}/__init__.py": "", f"{pkg}/paging.py": code, "tests/test_paging.py": test},
        {f"{pkg}/paging.py": code.replace("start = number * size", "start = (number - 1) * size")},
    )


def bisect(r: random.Random, pkg: str) -> Bug:
    xs = sorted(r.sample(range(100), r.randint(6, 10)))
    code = _src(
        '''
        def find_index(sorted_values, x):
            """Index of x in the ascending list sorted_values, or -1 when it is absent."""
            lo, hi = 0, len(sorted_values) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if sorted_values[mid] == x:
                    return mid
                if sorted_values[mid] < x:
                    lo = mid + 1
                else:
                    hi = mid - 1
            return -1
        '''
    )
    test = _src(
        f"""
        from {pkg}.search import find_index

        VALUES = {xs}


        def test_every_value_is_found():
            for i, x in enumerate(VALUES):
                assert find_index(VALUES, x) == i


        def test_absent():
            assert find_index(VALUES, 1000) == -1
            assert find_index([], 3) == -1
        """
    )
    return Bug(
        {f"{pkg}/__init__.py": "", f"{pkg}/search.py": code, "tests/test_search.py": test},
        {f"{pkg}/search.py": code.replace("while lo < hi:", "while lo <= hi:")},
    )


def grade(r: random.Random, pkg: str) -> Bug:
    a, b = r.choice([(90, 75), (85, 70), (80, 60), (88, 72)])
    code = _src(
        f'''
        def grade(score):
            """'A' from {a} up, 'B' from {b} up, else 'C'."""
            if score > {a}:
                return "A"
            if score >= {b}:
                return "B"
            return "C"
        '''
    )
    test = _src(
        f"""
        from {pkg}.grading import grade


        def test_grades():
            assert grade({a + 3}) == "A"
            assert grade({b + 1}) == "B"
            assert grade({b - 1}) == "C"


        def test_boundaries():
            assert grade({a}) == "A"
            assert grade({b}) == "B"
        """
    )
    return Bug(
        {f"{pkg}/__init__.py": "", f"{pkg}/grading.py": code, "tests/test_grading.py": test},
        {f"{pkg}/grading.py": code.replace(f"if score > {a}:", f"if score >= {a}:")},
    )


def leap(r: random.Random, pkg: str) -> Bug:
    years = r.sample([1996, 2004, 2012, 2020, 2024, 1999, 2001, 2023, 2100, 1800], 5)
    expected = {y: y % 4 == 0 and (y % 100 != 0 or y % 400 == 0) for y in years}
    code = _src(
        '''
        def is_leap(year):
            """Gregorian leap years: divisible by 4, except centuries not divisible by 400."""
            if year % 100 == 0:
                return False
            return year % 4 == 0
        '''
    )
    test = _src(
        f"""
        from {pkg}.calendar_rules import is_leap


        def test_years():
            for year, leap in {expected}.items():
                assert is_leap(year) == leap, year


        def test_four_hundred():
            assert is_leap(2000)
            assert is_leap(1600)
        """
    )
    fixed = code.replace(
        "    if year % 100 == 0:\n        return False\n",
        "    if year % 100 == 0:\n        return year % 400 == 0\n",
    )
    return Bug(
        {f"{pkg}/__init__.py": "", f"{pkg}/calendar_rules.py": code, "tests/test_calendar.py": test},
        {f"{pkg}/calendar_rules.py": fixed},
    )


def mean(r: random.Random, pkg: str) -> Bug:
    xs = [r.randint(1, 50) for _ in range(r.randint(3, 6))]
    code = _src(
        '''
        def mean(values):
            """The arithmetic mean of values; None for no values."""
            return sum(values) / len(values)
        '''
    )
    test = _src(
        f"""
        from {pkg}.summary import mean


        def test_mean():
            assert mean({xs}) == {sum(xs) / len(xs)!r}


        def test_empty():
            assert mean([]) is None
        """
    )
    fixed = code.replace(
        "    return sum(values) / len(values)",
        "    if not values:\n        return None\n    return sum(values) / len(values)",
    )
    return Bug(
        {f"{pkg}/__init__.py": "", f"{pkg}/summary.py": code, "tests/test_summary.py": test},
        {f"{pkg}/summary.py": fixed},
    )


def chunks(r: random.Random, pkg: str) -> Bug:
    n = r.randint(2, 4)
    start = r.randint(2, 5)
    xs = list(range(start, start + n * r.randint(2, 3) + r.randint(1, n - 1)))  # a partial last chunk
    expected = [xs[i : i + n] for i in range(0, len(xs), n)]
    code = _src(
        '''
        def chunks(values, n):
            """values cut into lists of n; the last one may be shorter."""
            whole = len(values) - len(values) % n
            return [values[i : i + n] for i in range(0, whole, n)]
        '''
    )
    test = _src(
        f"""
        from {pkg}.batching import chunks


        def test_even():
            assert chunks([1, 2, 3, 4], 2) == [[1, 2], [3, 4]]


        def test_remainder_is_kept():
            assert chunks({xs}, {n}) == {expected}
        """
    )
    fixed = code.replace(
        "    whole = len(values) - len(values) % n\n    return [values[i : i + n] for i in range(0, whole, n)]",
        "    return [values[i : i + n] for i in range(0, len(values), n)]",
    )
    return Bug(
        {f"{pkg}/__init__.py": "", f"{pkg}/batching.py": code, "tests/test_batching.py": test},
        {f"{pkg}/batching.py": fixed},
    )


def words(r: random.Random, pkg: str) -> Bug:
    vocab = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
    ws = [r.choice(vocab) for _ in range(r.randint(4, 7))]
    text = "  ".join(ws[:2]) + "\n" + " ".join(ws[2:]) + " "
    code = _src(
        '''
        def word_count(text):
            """The number of words in text (separated by any whitespace)."""
            return len(text.split(" "))
        '''
    )
    test = _src(
        f"""
        from {pkg}.text import word_count


        def test_simple():
            assert word_count("one two three") == 3


        def test_any_whitespace():
            assert word_count({text!r}) == {len(ws)}
            assert word_count("") == 0
        """
    )
    return Bug(
        {f"{pkg}/__init__.py": "", f"{pkg}/text.py": code, "tests/test_text.py": test},
        {f"{pkg}/text.py": code.replace('text.split(" ")', "text.split()")},
    )


def top(r: random.Random, pkg: str) -> Bug:
    names = r.sample(["ana", "ben", "cy", "dee", "eli", "fay", "gus", "hal"], 5)
    scores = dict(zip(names, r.sample(range(10, 99), 5), strict=True))
    n = r.randint(2, 3)
    best = sorted(scores, key=scores.get, reverse=True)[:n]
    code = _src(
        '''
        def top(scores, n):
            """The names of the n highest scores, best first."""
            return sorted(scores, reverse=True)[:n]
        '''
    )
    test = _src(
        f"""
        from {pkg}.ranking import top


        def test_top():
            assert top({scores}, {n}) == {best}
        """
    )
    return Bug(
        {f"{pkg}/__init__.py": "", f"{pkg}/ranking.py": code, "tests/test_ranking.py": test},
        {
            f"{pkg}/ranking.py": code.replace(
                "sorted(scores, reverse=True)", "sorted(scores, key=scores.get, reverse=True)"
            )
        },
    )


def suffix(r: random.Random, pkg: str) -> Bug:
    # stems ending in a character of the extension: rstrip eats them too
    ext, stem = r.choice(
        [(".txt", "receipt"), (".txt", "draft"), (".csv", "sales"), (".csv", "costs"), (".log", "backlog")]
    )
    code = _src(
        f'''
        def stem(filename, ext="{ext}"):
            """filename without the extension ext, when it ends with it."""
            return filename.rstrip(ext)
        '''
    )
    test = _src(
        f"""
        from {pkg}.names import stem


        def test_stem():
            assert stem("{stem}{ext}") == "{stem}"
            assert stem("archive.zip") == "archive.zip"
        """
    )
    return Bug(
        {f"{pkg}/__init__.py": "", f"{pkg}/names.py": code, "tests/test_names.py": test},
        {f"{pkg}/names.py": code.replace("filename.rstrip(ext)", "filename.removesuffix(ext)")},
    )


def default(r: random.Random, pkg: str) -> Bug:
    tags = r.sample(["new", "sale", "eco", "gift", "rare"], 2)
    code = _src(
        '''
        def tagged(name, tags=[]):
            """A record of name with its tags (a new list each call)."""
            tags.append("item")
            return {"name": name, "tags": tags}
        '''
    )
    test = _src(
        f"""
        from {pkg}.records import tagged


        def test_tags_are_not_shared():
            assert tagged("a")["tags"] == ["item"]
            assert tagged("b")["tags"] == ["item"]


        def test_given_tags():
            assert tagged("c", {tags})["tags"] == {tags + ["item"]}
        """
    )
    fixed = code.replace("def tagged(name, tags=[]):", "def tagged(name, tags=None):").replace(
        '    tags.append("item")', '    tags = list(tags or [])\n    tags.append("item")'
    )
    return Bug(
        {f"{pkg}/__init__.py": "", f"{pkg}/records.py": code, "tests/test_records.py": test},
        {f"{pkg}/records.py": fixed},
    )


def units(r: random.Random, pkg: str) -> Bug:
    length, width, height = (r.randint(1, 9) / 10 for _ in range(3))
    girth_cm = round((length + 2 * (width + height)) * 100, 6)
    conv = _src(
        """
        def m_to_cm(metres):
            return metres * 10
        """
    )
    ship = _src(
        f'''
        from {pkg}.units import m_to_cm


        def girth_cm(length_m, width_m, height_m):
            """Length plus twice width and height, in centimetres."""
            return round(m_to_cm(length_m + 2 * (width_m + height_m)), 6)
        '''
    )
    test = _src(
        f"""
        from {pkg}.shipping import girth_cm


        def test_girth():
            assert girth_cm({length}, {width}, {height}) == {girth_cm}
        """
    )
    return Bug(
        {
            f"{pkg}/__init__.py": "",
            f"{pkg}/units.py": conv,
            f"{pkg}/shipping.py": ship,
            "tests/test_shipping.py": test,
        },
        {f"{pkg}/units.py": conv.replace("metres * 10", "metres * 100")},
    )


def dispatch(r: random.Random, pkg: str) -> Bug:
    cmds = r.sample(["Start", "Stop", "Pause", "Resume", "Reset"], 3)
    registry = _src(
        '''
        HANDLERS = {}


        def register(name):
            """Registers a handler under its command name; names are case-insensitive."""

            def wrap(fn):
                HANDLERS[name.lower()] = fn
                return fn

            return wrap
        '''
    )
    handlers = "".join(
        f"\n\n@register({c!r})\ndef {c.lower()}_handler():\n    return {c.lower()!r}\n" for c in cmds
    )
    commands = (
        _src(
            f'''
        from {pkg}.registry import HANDLERS, register


        def run(name):
            """Runs the handler registered for command `name` (any case)."""
            return HANDLERS[name]()
        '''
        )
        + handlers
    )
    test = _src(
        f"""
        from {pkg}.commands import run


        def test_commands_in_any_case():
            assert run({cmds[0]!r}) == {cmds[0].lower()!r}
            assert run({cmds[1].upper()!r}) == {cmds[1].lower()!r}
            assert run({cmds[2].lower()!r}) == {cmds[2].lower()!r}
        """
    )
    return Bug(
        {
            f"{pkg}/__init__.py": "",
            f"{pkg}/registry.py": registry,
            f"{pkg}/commands.py": commands,
            "tests/test_commands.py": test,
        },
        {
            f"{pkg}/commands.py": commands.replace(
                "return HANDLERS[name]()", "return HANDLERS[name.lower()]()"
            )
        },
    )


KINDS: dict[str, Callable[[random.Random, str], Bug]] = {
    f.__name__: f
    for f in (window, pages, bisect, grade, leap, mean, chunks, words, top, suffix, default, units, dispatch)
}


def build(kind: str, seed: int) -> tuple[str, Bug]:
    r = random.Random(f"coding:{kind}:{seed}")
    pkg = r.choice(PACKAGES)
    bug = KINDS[kind](r, pkg)
    for path, text in bug.fixed.items():
        if text == bug.files[path]:
            raise AssertionError(f"{kind}-{seed}: the fix of {path} changes nothing")
    return f"{kind}-{seed:03d}", bug


def reference_patch(bug: Bug) -> str:
    out = []
    for path in sorted(bug.fixed):
        a, b = bug.files[path].splitlines(keepends=True), bug.fixed[path].splitlines(keepends=True)
        out += difflib.unified_diff(a, b, f"a/{path}", f"b/{path}")
    return "".join(out)


def task_yaml(name: str) -> dict:
    return {
        "name": name,
        "goal": GOAL,
        "tools": TOOLS,
        "workspace": {"from": "repo"},
        "executor": {"endpoint": "flash", "effort": "medium"},
        "frontier": {"endpoint": "frontier", "effort": "high"},
        "check": {"type": "command", "run": CHECK, "timeout_s": 120, "max_attempts": 3},
    }


def generate(kind: str, seed: int, root: Path) -> Path:
    name, bug = build(kind, seed)
    out = Path(root) / name
    if out.exists():
        shutil.rmtree(out)
    for path, text in bug.files.items():
        p = out / "repo" / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    (out / "reference.patch").write_text(reference_patch(bug), encoding="utf-8")
    (out / "task.yaml").write_text(yaml.safe_dump(task_yaml(name), sort_keys=False), encoding="utf-8")
    return out


SUITE_YAML = {
    "name": "coding",
    "tasks": ["tasks/*/task.yaml"],
    "defaults": {
        "escalation": {"after_failures": 2, "at": ["replan"], "mode": "advise", "max_consults": 3},
        "budget": {"max_usd": 0.5, "max_steps": 30, "max_wall_s": 600},
        "shell": {"sandbox": "bwrap"},
    },
}


def build_suite(root: Path, per_kind: int = 2) -> list[Path]:
    root = Path(root)
    tasks = root / "tasks"
    if tasks.exists():
        shutil.rmtree(tasks)
    made = [generate(kind, seed, tasks) for kind in KINDS for seed in range(per_kind)]
    header = (
        "# Generated by `python -m advisor.evals.coding` (evals/coding.py). Endpoints `flash` and `frontier` come\n"
        "# from --endpoints advisor.yaml, an advisor.yaml in your config directory, or an `endpoints:` block here.\n"
        "# Without bubblewrap set defaults.shell.sandbox to limits.\n"
    )
    (root / "suite.yaml").write_text(header + yaml.safe_dump(SUITE_YAML, sort_keys=False), encoding="utf-8")
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m advisor.evals.coding", description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="suite folder to (re)write, e.g. evals/suites/coding")
    ap.add_argument("--per-kind", type=int, default=2, help="seeds per kind (13 kinds)")
    args = ap.parse_args(argv)
    made = build_suite(args.root, args.per_kind)
    print(f"wrote {len(made)} tasks under {args.root / 'tasks'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
