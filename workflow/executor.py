"""Where a step's function runs: the strategy a Runner is given (in the style of rq's workers).

The runner decides *what* runs (which attempt, when to retry, what to settle) and alone writes
the store; an executor only runs one function call and hands back its value or its exception.
Without one, the runner calls `call_as_step` in the driver; `pool.ProcessPool` runs the call in a
pool of step processes. The exception is a PostgreSQL fleet (fleet.py, `settles = True`): there
the runner hands over the whole step, because its executors, on any machine, count its attempts,
retry it and resolve it in the same transaction as the step's own writes; the runner enqueues
it and replays the promise they settle.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from .context import StepInfo, _current_step
from .deadline import deadline


class StepExecutor(abc.ABC):
    """Runs step functions for a runner; `capacity` of them at once (one per calling thread)."""

    capacity: int = 1
    # True for an executor that settles the steps it runs itself (a PostgreSQL fleet, where a
    # step's writes and its resolve are one transaction): the runner hands it the whole step
    # (`settle_remotely(promise_id, policy) -> Promise`) and replays the promise it returns.
    settles: bool = False

    @abc.abstractmethod
    def run(
        self,
        info: StepInfo,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        """Call `fn(*args, **kwargs)` as the step `info` describes (what `current_step()` returns
        meanwhile), failing it with StepTimeoutError after `timeout` seconds; return its value or
        raise its exception. StepProcessLost when the process running it died."""

    def close(self) -> None:  # noqa: B027  (optional: nothing to release)
        """Release what the executor holds (processes); idempotent."""


class StepProcessLost(Exception):
    """The process running an attempt died (killed, or crashed) before it answered: the attempt
    is spent, and the step is retried like any failure."""


def call_as_step(
    info: StepInfo,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None,
) -> Any:
    """Call `fn` with `current_step()` describing `info`, under the step's deadline if any."""
    token = _current_step.set(info)
    try:
        if timeout is None:
            return fn(*args, **kwargs)
        with deadline(timeout, f"step '{info.fn}' ({info.promise_id})"):
            return fn(*args, **kwargs)
    finally:
        _current_step.reset(token)
