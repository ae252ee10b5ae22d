"""The proxy's append-only journal (`journal.jsonl`): one event a line, group-committed.

Durability: `emit` only queues a line; `commit` writes every queued line in one write(2) to the file
(opened O_APPEND, never truncated). The router commits before any reply, or any part of a stream,
that depends on those events goes to the client, so whatever a client has been told is in the
operating system's hands first: a proxy that crashes, is killed or restarts loses nothing a client
saw. Surviving a machine crash or power loss needs the data on the disk as well: a background thread
fsyncs the file after commits, at most once per `fsync_interval_s` (default 0.05 s), so such a crash
can lose at most the events of about the last interval plus one fsync. Writing and fsyncing per
event, as the loop's Trace does, cost a proxy more CPU than the rest of a request.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from advisor import fastjson

FSYNC_INTERVAL_S = 0.05


class Journal:
    def __init__(self, path: Path, *, fsync: bool = True, fsync_interval_s: float = FSYNC_INTERVAL_S):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pending: list[bytes] = []
        self._seq = 0
        self._fsync = fsync
        self._interval = fsync_interval_s
        self._lock = threading.Lock()  # the fsync thread never touches a closed descriptor
        self._due = threading.Event()
        self._thread: threading.Thread | None = None
        if fsync:
            self._thread = threading.Thread(target=self._syncer, name="advisor-journal-fsync", daemon=True)
            self._thread.start()

    def emit(self, type_: str, **fields: Any) -> dict:
        """Queues one event (written at the next `commit`); returns it."""
        event = {"seq": self._seq, "t": time.time(), "type": type_, **fields}
        self._seq += 1
        self._pending.append(fastjson.dumps(event, default=str) + b"\n")
        return event

    def commit(self) -> None:
        """Writes the queued events in one write(2); the fsync follows in the background."""
        if not self._pending or self._fd is None:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        view = memoryview(data)
        while view:  # a regular file takes it whole, short of a full disk; loop to be exact anyway
            view = view[os.write(self._fd, view) :]
        if self._fsync and not self._due.is_set():
            self._due.set()

    def _syncer(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            with self._lock:
                if self._fd is None:
                    return
                os.fsync(self._fd)
            time.sleep(self._interval)  # commits meanwhile share the next fsync

    def close(self) -> None:
        """Commits, fsyncs (blocking: call it from a thread in async code) and closes."""
        self.commit()
        with self._lock:
            if self._fd is None:
                return
            if self._fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        self._due.set()  # the fsync thread sees the closed descriptor and ends
