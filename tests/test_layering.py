"""The packages form one stack, training -> evals -> advisor -> tools -> engine: a module imports only
from its own layer or ones to its right, and no modules import each other in a circle. Imports inside
functions count too (a lazy import hides an arrow; it does not remove it). evals, tools and engine are
installed under the advisor namespace (advisor.evals, ...) but stay layers of their own: the advisor layer
is the rest of advisor.*."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACK = ("training", "evals", "advisor", "tools", "engine")
# the repository folder each layer lives in -> its import name
PACKAGE = {"training": "training", "evals": "advisor.evals", "advisor": "advisor", "tools": "advisor.tools",
           "engine": "advisor.engine"}


def layer(module: str) -> str | None:
    """The layer a dotted module name belongs to (the longest matching package), or None outside the stack."""
    best = None
    for name, package in PACKAGE.items():
        if (module == package or module.startswith(package + ".")) and (
            best is None or len(package) > len(PACKAGE[best])
        ):
            best = name
    return best

# Known arrows running back up, each with why it is still there. A new one fails the test; remove an
# entry when its arrow goes.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for top in STACK:
        for path in (ROOT / top).rglob("*.py"):
            if any(
                not (d / "__init__.py").is_file() for d in path.parents if d != ROOT and ROOT in d.parents
            ):
                continue  # not part of the package (e.g. the repositories inside eval suites' tasks)
            parts = list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([PACKAGE[top], *parts])] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The modules of the stack that `name` imports (a `from pkg import sub` names the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in mods]
            found.update(subs or [source])
    return {m for m in found if layer(m) is not None}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_no_import_runs_back_up_the_stack():
    upward = sorted(
        (src, dst)
        for src, targets in _graph().items()
        for dst in targets
        if STACK.index(layer(dst)) < STACK.index(layer(src)) and (src, dst) not in KNOWN_UPWARD
    )
    assert not upward, (
        "imports running back up training -> evals -> advisor -> tools -> engine: "
        + ", ".join(f"{a} -> {b}" for a, b in upward)
    )


def test_no_modules_import_each_other_in_a_circle():
    graph = _graph()
    mods = set(graph)
    # a submodule's import of its own package (`from advisor.engine import X` in engine/x.py) is not an arrow:
    # the package is loaded before any of its submodules anyway
    edges = {
        a: {b for b in targets if b in mods and b != a and not a.startswith(b + ".")}
        for a, targets in graph.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, path)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not circles, "modules importing each other: " + "; ".join(" -> ".join(c) for c in circles)
