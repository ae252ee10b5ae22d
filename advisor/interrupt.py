"""Ctrl-C for the CLI: the first one cancels the run and lets it clean up, a second one ends it at once.

`run(main)` is `asyncio.run(main)` with its own SIGINT handling. asyncio's own turns a first Ctrl-C into a
cancellation too, but then re-raises KeyboardInterrupt through every awaiting frame (a screenful of
CancelledError tracebacks) and waits for worker threads however long they take. Here the first SIGINT
cancels `main` (its `finally` blocks run: traces are already flushed per event, endpoints and progress
displays close) and `run` raises `Interrupted`, for the caller to say in one line what finished and then
`leave()` (status 130, without waiting for busy worker threads); a second SIGINT, during that cleanup,
exits with status 130 at once.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")
EXIT_CODE = 130  # 128 + SIGINT, what shells report for a command ended by Ctrl-C


class Interrupted(Exception):
    """The run was cancelled by Ctrl-C (SIGINT); whatever had finished is kept."""


def rerun_command() -> str:
    """The command line this process was started with, as the user would type it again to resume."""
    return shlex.join(["advisor", *sys.argv[1:]])


def leave() -> NoReturn:
    """Ends the process with status 130 now: what the run wrote is flushed already (traces per event,
    results atomically), and worker threads still busy (a model loading, a batch generating) would only
    make the user wait for work nobody will read."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_CODE)


def _exit_now(signum, frame) -> None:
    try:
        sys.stderr.write("\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_CODE)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Runs `main` on a new event loop; `Interrupted` when Ctrl-C cancelled it."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(main)
    interrupted = False

    def first(signum, frame) -> None:
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, _exit_now)  # kept after the loop: threads may still be finishing
        loop.call_soon_threadsafe(task.cancel)

    previous = signal.signal(signal.SIGINT, first)
    try:
        try:
            result = loop.run_until_complete(task)
        except asyncio.CancelledError:
            if interrupted:
                raise Interrupted() from None
            raise
        finally:
            _cancel_rest(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            if not interrupted:  # after Ctrl-C, a worker thread (a model loading) is not waited for
                loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
        if interrupted:  # `main` took the cancellation and returned early: still an interrupted run
            raise Interrupted()
        return result
    finally:
        if not interrupted:
            signal.signal(signal.SIGINT, previous)


def _cancel_rest(loop: asyncio.AbstractEventLoop) -> None:
    rest = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in rest:
        t.cancel()
    if rest:
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
