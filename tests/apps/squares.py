"""A small application for the tests of `python -m workflow run` and `supervisor exec`.

A test copies this file into its tmp_path as `squares.py` and runs it from there, as a user runs
their own module. Every attempt of a step appends a line to `steps.log` beside it, so a test can
tell which steps ran, how often, and in which process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workflow import Context, PermanentError, RunInfo, current_step, register

LOG = Path(__file__).with_name("steps.log")
BROKEN: tuple[int, ...] = ()  # the squares that fail: a test rewrites this line to break, then fix


class NoSuchSquare(PermanentError):
    """No retry makes a negative count of squares right."""


@register(name="square")
def square(i: int, pause: float) -> int:
    step = current_step()
    with LOG.open("a") as log:
        log.write(json.dumps({"id": step.promise_id, "attempt": step.attempt, "pid": os.getpid()}) + "\n")
    time.sleep(pause)
    if i in BROKEN:
        raise ValueError(f"square {i} is broken")
    return i * i


@register(name="squares")
def squares(ctx: Context, n: int, pause: float = 0.0) -> Generator[Any, Any, list[int]]:
    """The squares of 0..n-1, one durable step each."""
    results = []
    for i in range(n):
        results.append((yield ctx.run(square, i, pause)))
    return results


@register(name="refuse")
def refuse(reason: str) -> None:
    raise NoSuchSquare(reason)


@register(name="refusing")
def refusing(ctx: Context) -> Generator[Any, Any, None]:
    """A workflow whose one step fails with a PermanentError."""
    yield ctx.run(refuse, "not today")


@contextmanager
def setup(run: RunInfo) -> Iterator[dict[str, Any]]:
    """A setup hook: refuses a negative count before the store is opened."""
    if run.args and run.args[0] < 0:
        raise NoSuchSquare(f"cannot make {run.args[0]} squares")
    yield {}

