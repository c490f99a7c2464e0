"""SIGTERM (a scheduler's kill, `kill PID`, a cluster's preemption) ends a run like an error:
the run's summary says `failed`, a sweep closes its trial as failed, and the process exits
128 + 15 = 143, the shell's code for "killed by SIGTERM" (Lightning's own handler would end the
fit with `SystemExit(None)`: exit 0, which schedulers and sweep drivers read as success)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(SystemExit):
    """Raised in the main thread when the process receives SIGTERM; not an `Exception`, so no
    `except Exception` on the way up swallows it. Its exit code is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"received {signal.Signals(self.signum).name}"


# SIGTERMs received while a write that must not be cut in half runs (`deferred_sigterm`): raised
# when the outermost such block ends. Only the main thread handles signals, so only it counts.
_deferral = {"depth": 0, "pending": None}


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    if _deferral["depth"]:
        _deferral["pending"] = signum
        return
    raise Terminated(signum)


@contextmanager
def deferred_sigterm() -> Iterator[None]:
    """Hold back `Terminated` until the block ends: a SIGTERM that lands inside a database
    commit would leave the connection's transaction broken, and every later write of the
    process (closing the interrupted trial) would fail. No effect outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
        pending = _deferral["pending"]
        if not _deferral["depth"] and pending is not None:
            _deferral["pending"] = None
            raise Terminated(pending)


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Inside this block SIGTERM raises `Terminated` (Lightning keeps calling this handler from
    its own while a fit runs); the previous handler is restored after. Outside the main thread
    (a launcher's worker thread) signals cannot be handled: the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
