"""Live progress of running tasks, fed by trace events and by the library's log notes (a model loading, the
engine's ops compiling): a rich table under a spinner line, or, without a terminal, one line per event."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator

from rich.console import Console, Group
from rich.spinner import Spinner
from rich.table import Table

from advisor.pricing import usd

# the loggers whose INFO notes say what a run is waiting for (model loads, the engine's first compile)
NOTE_LOGGERS = ("advisor",)


def _short(value: object, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Progress:
    """Live state per task, fed by trace events (`__call__`) and notes (`note`).

    With a `console`, each step, tool call, answer, check, consult and finished task prints a line as it
    happens (only finished tasks with `every_event` False). With `live` (a terminal), the state is also
    kept for `renderable()`, which a rich Live on that console shows below those lines, and notes go to
    its spinner (only lasting ones, warnings, print).
    """

    def __init__(
        self,
        names: list[str],
        console: Console | None = None,
        *,
        live: bool = False,
        every_event: bool = True,
    ):
        self.rows = {n: self._row() for n in names}
        self.console = console
        self.live = live
        self.every_event = every_event
        self.activity = "starting"
        self._mu = threading.Lock()

    @staticmethod
    def _row() -> dict:
        return {"status": "queued", "steps": 0, "consults": 0, "usd": 0.0, "doing": ""}

    def _print(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False)

    def _line(self, text: str, event: bool = True) -> None:
        if self.every_event or not event:  # under a Live, console.print writes above the live table
            self._print(text)

    def note(self, text: str, lasting: bool = False) -> None:
        """What the run is waiting for now (the spinner's text); printed as a line without a live
        display, and with one when `lasting` (warnings)."""
        with self._mu:
            self.activity = text
        if lasting or not self.live:
            self._print(text)

    def __call__(self, name: str, event: dict) -> None:
        with self._mu:
            row = self.rows.setdefault(name, self._row())
        kind = event["type"]
        step = event.get("step")
        if kind == "task_start":
            row["status"] = "running"
            row["doing"] = "preparing"
            self.activity = f"{name}: started"
        elif kind == "model_call":
            row["usd"] += event.get("cost_usd") or 0.0
            row["steps"] = max(row["steps"], step or 0)
            who = f"{event.get('role')} ({event.get('model')})"
            if event.get("error"):
                row["doing"] = f"{who} call failed"
                self._line(f"{name}: step {step} {who}: failed: {event['error']}")
            else:
                row["doing"] = f"{who} replied"
                latency = event.get("latency_s") or 0.0
                self._line(
                    f"{name}: step {step} {who} {event.get('purpose')}: {latency:.1f} s, {usd(event.get('cost_usd'))}"
                )
        elif kind == "tool_call":
            row["doing"] = f"tool {event.get('name')}"
            self._line(f"{name}: step {step} tool {event.get('name')}({_short(event.get('arguments'))})")
        elif kind == "tool_result" and event.get("is_error"):
            self._line(
                f"{name}: step {step} tool {event.get('name')} failed: {_short(event.get('text', ''), 100)}"
            )
        elif kind == "answer":
            row["doing"] = f"answered {_short(event.get('answer'), 30)}"
            self._line(
                f"{name}: step {step} answer by the {event.get('by')}: {_short(event.get('answer'), 80)}"
            )
        elif kind == "check":
            row["doing"] = "check passed" if event.get("passed") else "check rejected the answer"
            self._line(f"{name}: check {'passed' if event.get('passed') else 'rejected the answer'}")
        elif kind == "consult":
            row["consults"] += 1
            row["doing"] = f"consult ({event.get('trigger')})"
            self._line(f"{name}: step {step} consult at {event.get('trigger')} ({event.get('mode')})")
        elif kind == "task_end":
            row["status"] = event["outcome"]
            row["doing"] = ""
            self._line(
                f"{name}: {event['outcome']} after {row['steps']} steps, "
                f"{row['consults']} consults, {usd(row['usd'])}",
                event=False,
            )

    def table(self) -> Table:
        t = Table(title="advisor run", expand=False)
        for col in ("task", "status", "step", "doing", "consults", "USD so far"):
            t.add_column(col, justify="left" if col in ("task", "doing") else "right")
        for name, r in self.rows.items():
            t.add_row(name, r["status"], str(r["steps"]), r["doing"], str(r["consults"]), usd(r["usd"]))
        total = sum(r["usd"] for r in self.rows.values())
        t.caption = f"running cost {usd(total)}"
        return t

    def renderable(self) -> Group:
        """The spinner line (what the run waits for now) above the table, for a rich Live."""
        with self._mu:
            activity = self.activity
        return Group(Spinner("dots", text=activity), self.table())


class _NoteHandler(logging.Handler):
    def __init__(self, progress: Progress):
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.note(record.getMessage(), lasting=record.levelno >= logging.WARNING)
        except Exception:  # a display problem must never end a run
            self.handleError(record)


@contextlib.contextmanager
def notes_to(progress: Progress) -> Iterator[None]:
    """While inside, the library's INFO notes and warnings (`NOTE_LOGGERS`) go to `progress` instead of
    the log's own handlers."""
    handler = _NoteHandler(progress)
    saved = []
    for name in NOTE_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
