"""Live progress of running tasks, fed by trace events: a rich table, or one line per finished task."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def usd(x: float) -> str:
    return f"${x:.6f}" if x < 0.01 else f"${x:.4f}"


class Progress:
    """Live state per task, fed by trace events."""

    def __init__(self, names: list[str], console: Console | None = None):
        self.rows = {n: {"status": "queued", "steps": 0, "consults": 0, "usd": 0.0} for n in names}
        self.console = console  # without a terminal, one line per finished task instead of a live table

    def __call__(self, name: str, event: dict) -> None:
        row = self.rows.setdefault(name, {"status": "queued", "steps": 0, "consults": 0, "usd": 0.0})
        kind = event["type"]
        if kind == "task_start":
            row["status"] = "running"
        elif kind == "model_call":
            row["usd"] += event.get("cost_usd") or 0.0
            row["steps"] = max(row["steps"], event.get("step") or 0)
        elif kind == "consult":
            row["consults"] += 1
        elif kind == "task_end":
            row["status"] = event["outcome"]
            if self.console is not None:
                self.console.print(
                    f"{name}: {event['outcome']} after {row['steps']} steps, "
                    f"{row['consults']} consults, {usd(row['usd'])}",
                    markup=False,
                    highlight=False,
                )

    def table(self) -> Table:
        t = Table(title="advisor run", expand=False)
        for col in ("task", "status", "steps", "consults", "USD so far"):
            t.add_column(col, justify="right" if col != "task" else "left")
        for name, r in self.rows.items():
            t.add_row(name, r["status"], str(r["steps"]), str(r["consults"]), usd(r["usd"]))
        total = sum(r["usd"] for r in self.rows.values())
        t.caption = f"running cost {usd(total)}"
        return t
