"""A deadline for one step attempt, so a step that never returns becomes a retried failure.

It uses SIGALRM: the exception is raised in the main thread wherever the step is, between two
bytecodes or in a blocking system call (which Python interrupts to run the handler). Code stuck in
C without returning to Python is not interrupted; the supervisor's stall check covers a worker
that stops altogether. A step is run in the main thread, so this is the one place the runtime
touches a signal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StepTimeoutError(Exception):
    """An attempt of a step did not return within its policy's timeout."""


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise StepTimeoutError in the body if it runs longer than `seconds`."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"{what}: a step timeout needs the main thread (it uses SIGALRM)")

    def expire(_signum: int, _frame: object) -> None:
        raise StepTimeoutError(f"{what} did not return within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
