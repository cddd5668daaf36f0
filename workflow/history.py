"""A workflow's history as a store holds it: its root, its direct steps, and the call each records.

The runner writes this history; tools that look at it (a supervisor's `status` and `retry`) read
it here, through the store API and ids.py, never through the layout of a promise's param.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from store import Promise, PromiseStore, State

from .errors import is_cancellation
from .ids import children_prefix, is_root, step_index
from .registry import describe


@dataclass(frozen=True)
class RecordedCall:
    """The function (registered name and version) and arguments a promise was created for."""

    fn: str
    version: int
    args: list[Any]
    kwargs: dict[str, Any]


def recorded_call(promise: Promise) -> RecordedCall | None:
    """The call `promise` records; None if something other than the runner created it."""
    param = promise.param
    if not isinstance(param, dict) or not isinstance(param.get("fn"), str):
        return None
    return RecordedCall(param["fn"], param.get("v", 1), list(param.get("args", [])),
                        dict(param.get("kwargs", {})))


def state_of(promise: Promise) -> str:
    """A workflow's state in words: pending, resolved, rejected, or cancelled (a root rejected
    by a cancel, which `retry` resumes like a failure)."""
    if promise.state is State.REJECTED and is_cancellation(promise.error):
        return "cancelled"
    return promise.state.value


def records_call_of(promise: Promise, fn: Callable[..., Any]) -> bool:
    """Whether `promise` was created for a call of `fn`'s registered name (of any version)."""
    call = recorded_call(promise)
    return call is not None and call.fn == describe(fn).name


@dataclass(frozen=True)
class History:
    """A root workflow's promise, every call under it (at any depth, in creation order), and its
    direct steps (`<root>.<n>`) by step number."""

    root: Promise
    calls: list[Promise]
    steps: dict[int, Promise]

    def of(self, fn: str | None) -> History:
        """This history with only the direct steps that call the registered name `fn` (all of
        them for None): an application's units, such as the import's batches among its plan
        steps. Their keys stay their step numbers."""
        if fn is None:
            return self
        steps = {n: p for n, p in self.steps.items() if (call := recorded_call(p)) and call.fn == fn}
        return History(self.root, self.calls, steps)

    def in_state(self, state: State) -> list[Promise]:
        return [p for p in self.steps.values() if p.state is state]

    @property
    def first_pending(self) -> Promise | None:
        return next(iter(self.in_state(State.PENDING)), None)

    @property
    def attempts(self) -> int:
        """Attempts started by the direct steps, all told (kills and retries included)."""
        return sum(p.attempts for p in self.steps.values())

    @property
    def last_error(self) -> dict[str, Any] | None:
        """The error of the last rejected step, or else of the root; None without any."""
        errors = [p.error for p in [*self.steps.values(), self.root] if p.error]
        return errors[-1] if errors else None


def read_history(store: PromiseStore, root_id: str) -> History | None:
    """The history of the workflow `root_id`; None if the store has no such workflow."""
    root = store.get(root_id)
    if root is None:
        return None
    calls = store.list(children_prefix(root_id))
    return History(root, calls, {n: p for p in calls if (n := step_index(root_id, p.id)) is not None})


def root_ids(store: PromiseStore) -> list[str]:
    """The ids of the root workflows in a store, in creation order."""
    return [p.id for p in store.list() if is_root(p.id)]
