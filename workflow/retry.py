"""Retry policy of a step: exponential backoff with tenacity, counted in durable attempts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tenacity

from store import StoreError

from .errors import EngineError, PermanentError

log = logging.getLogger("workflow.retry")

MAX_TIMEOUT_S = 1e6  # eleven days: beyond it the timer overflows long before it could matter

# Failures of the engine itself are never retried as if the step had failed, nor an error the
# application declared permanent.
_NEVER_RETRIED: tuple[type[BaseException], ...] = (StoreError, EngineError, PermanentError)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how soon a failing step runs again (defaults in the style of Temporal).

    `max_attempts` counts every attempt started, including one cut short by a crash, so a step
    that kills its worker every time is eventually rejected instead of looping forever.
    `timeout` (seconds) fails an attempt that has not returned by then with StepTimeoutError,
    which is retried like any failure (see deadline.py for how and where it can interrupt).
    A PermanentError is never retried, nor are the `non_retryable` exception types.
    """

    max_attempts: int = 10
    initial: float = 1.0
    factor: float = 2.0
    max_interval: float = 30.0
    non_retryable: tuple[type[BaseException], ...] = ()
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.timeout is not None and not 0 < self.timeout <= MAX_TIMEOUT_S:
            raise ValueError(
                f"timeout must be above 0 and at most {MAX_TIMEOUT_S:g} seconds, not {self.timeout}"
            )
        if self.initial < 0 or self.factor < 1 or self.max_interval < 0:
            raise ValueError(f"invalid backoff: {self}")

    def retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, Exception) and not isinstance(
            exc, _NEVER_RETRIED + self.non_retryable
        )

    def retrying(
        self,
        *,
        attempts_done: int,
        on_retry: Callable[[int, BaseException, float], None],
        sleep: Callable[[float], Any],
    ) -> tenacity.Retrying:
        """A tenacity Retrying for what is left of the budget after `attempts_done` attempts.

        Tenacity numbers its attempts from 1; attempt k of this Retrying is durable attempt
        `attempts_done + k - 1` (its first attempt is the failure that brought us here), so the
        backoff is shifted to continue from there.
        """
        first = attempts_done
        try:
            multiplier = min(self.max_interval, self.initial * self.factor ** (first - 1))
        except OverflowError:  # after a thousand attempts or so: the cap applies anyway
            multiplier = self.max_interval
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_attempts - first + 1),
            wait=tenacity.wait_exponential(
                multiplier=multiplier, exp_base=self.factor, max=self.max_interval
            ),
            retry=tenacity.retry_if_exception(self.retryable),
            before_sleep=lambda state: on_retry(
                first + state.attempt_number - 1,
                state.outcome.exception(),
                state.upcoming_sleep,
            ),
            sleep=sleep,
            reraise=True,
        )
