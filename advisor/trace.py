"""Append-only JSONL trace: one event a line, flushed and fsynced as it happens (see docs/trace-format.md)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Listener = Callable[[dict], None]


class Trace:
    """Writes events to `path` (when given) and passes them to listeners (live progress, tests)."""

    def __init__(self, path: Path | None, *, fsync: bool = True, listeners: list[Listener] | None = None):
        self.path = path
        self._fsync = fsync
        self._seq = 0
        self._listeners = list(listeners or [])
        self._fh = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Append, never truncate: a trace survives a crash and a re-run adds to it.
            self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def emit(self, type_: str, **fields: Any) -> dict:
        event = {"seq": self._seq, "t": time.time(), "type": type_, **fields}
        self._seq += 1
        if self._fh is not None:
            self._fh.write(json.dumps(event, default=str, ensure_ascii=False) + "\n")
            self._fh.flush()
            if self._fsync:
                os.fsync(self._fh.fileno())
        for listener in self._listeners:
            listener(event)
        return event

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_trace(path: Path) -> list[dict]:
    """Events of a trace; a torn last line (the process died mid-write) is ignored."""
    events = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return events
