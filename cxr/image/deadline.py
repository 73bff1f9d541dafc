"""A per-file time limit inside a worker: a damaged or hostile file must become an errors row, not a stuck task.

SIGALRM (setitimer) interrupts Python-level work (pydicom, numpy steps) at once; a single C call (one
cv2.imdecode) cannot be interrupted safely, so its alarm is raised as soon as it returns. Spark runs each
Python worker's tasks in the process's main thread; anywhere else (a thread, Windows) there is no alarm and
the caller's after-the-fact check of the elapsed time is the only limit.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator

__all__ = ["TimeLimitExceeded", "time_limit", "uninterrupted"]


class TimeLimitExceeded(BaseException):
    """BaseException, so that decoders' own `except Exception` clauses cannot swallow it."""

    def __init__(self, seconds: float):
        super().__init__(f"took longer than {seconds:g} s")
        self.seconds = seconds


_STATE = {"critical": 0, "pending": None, "limit": None}


def _on_alarm(signum, frame):
    if _STATE["critical"]:  # inside a section that must finish (e.g. fd 2 redirected): raise at its end
        _STATE["pending"] = _STATE["limit"]
        return
    raise TimeLimitExceeded(_STATE["limit"])


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A section the alarm must not cut in half; a limit reached inside is raised when it ends."""
    _STATE["critical"] += 1
    try:
        yield
    finally:
        _STATE["critical"] -= 1
        pending = _STATE["pending"]
        if pending is not None and not _STATE["critical"]:
            _STATE["pending"] = None
            raise TimeLimitExceeded(pending)


def _alarm_available() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise TimeLimitExceeded in the block once `seconds` have passed (no limit for None or <= 0)."""
    if not seconds or seconds <= 0 or not _alarm_available():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    _STATE.update(limit=float(seconds), pending=None)
    started = time.perf_counter()
    exceeded = False
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    except TimeLimitExceeded:
        exceeded = True
    finally:
        while True:  # the one-shot alarm may land here too: catch it and finish restoring
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                _STATE["pending"] = None
                break
            except TimeLimitExceeded:
                exceeded = True
    if exceeded or time.perf_counter() - started > seconds:  # also a C call that overran and ended the block
        raise TimeLimitExceeded(seconds)
