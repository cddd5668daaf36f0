"""The durable promise: the unit the store keeps and the runtime replays."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NamedTuple


class State(StrEnum):
    PENDING = "pending"
    RESOLVED = "resolved"
    REJECTED = "rejected"


class Promise(NamedTuple):
    """A snapshot of one promise; stores hand out new snapshots, never mutate one.

    A NamedTuple rather than a frozen dataclass: replay builds one per step, and this is the
    cheapest immutable record Python has.

    `attempts` counts every attempt ever started. `attempts_at_reopen` is the count when an
    operator last reopened a rejected promise, so a retry budget restarts without losing history.
    """

    id: str
    param: Any
    state: State = State.PENDING
    value: Any = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    attempts_at_reopen: int = 0
    created_at: float = 0.0
    settled_at: float | None = None

    @property
    def settled(self) -> bool:
        return self.state is not State.PENDING

    @property
    def attempts_since_reopen(self) -> int:
        return self.attempts - self.attempts_at_reopen
