"""Append-only JSONL trace: one event a line, flushed as it happens and fsynced right after
(see docs/trace-format.md).

`emit` writes and flushes the line at once (a reader sees it immediately); the fsync, which can take
milliseconds, is done by one background thread so it never blocks the event loop. Many events of one
file waiting for that thread share one fsync.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from advisor import fastjson

Listener = Callable[[dict], None]


class _Syncer:
    """One daemon thread fsyncing traces that have unsynced lines."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._dirty: dict[int, Trace] = {}
        self._thread: threading.Thread | None = None

    def mark(self, trace: Trace) -> None:
        with self._cond:
            self._dirty[id(trace)] = trace
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="advisor-trace-fsync", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._dirty:
                    self._cond.wait()
                batch = list(self._dirty.values())
                self._dirty.clear()
            for trace in batch:
                trace._sync()


_SYNCER = _Syncer()


class Trace:
    """Writes events to `path` (when given) and passes them to listeners (live progress, tests)."""

    def __init__(self, path: Path | None, *, fsync: bool = True, listeners: list[Listener] | None = None):
        self.path = path
        self._fsync = fsync
        self._seq = 0
        self._listeners = list(listeners or [])
        self._fh = None
        self._lock = threading.Lock()  # the fsync thread and close() never touch a closed file
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Append, never truncate: a trace survives a crash and a re-run adds to it.
            self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def emit(self, type_: str, **fields: Any) -> dict:
        event = {"seq": self._seq, "t": time.time(), "type": type_, **fields}
        self._seq += 1
        if self._fh is not None:
            self._fh.write(fastjson.dumps(event, default=str).decode() + "\n")
            self._fh.flush()
            if self._fsync:
                _SYNCER.mark(self)
        for listener in self._listeners:
            listener(event)
        return event

    def append(self, event: dict) -> None:
        """Writes an event made elsewhere (a Ray worker's), its own seq and time kept, and passes it to
        the listeners: what the driver of a cluster run does with each event it receives."""
        if self._fh is not None:
            self._fh.write(fastjson.dumps(event, default=str).decode() + "\n")
            self._fh.flush()
            if self._fsync:
                _SYNCER.mark(self)
        self._seq = max(self._seq, int(event.get("seq", -1)) + 1)
        for listener in self._listeners:
            listener(event)

    def _sync(self) -> None:
        with self._lock:
            if self._fh is not None:
                os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Flushes, fsyncs (blocking: call it from a thread in async code) and closes."""
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                if self._fsync:
                    os.fsync(self._fh.fileno())
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
