"""The store operations, once, for every backend that folds its records into an in-memory index.

A backend says how records are kept (`_append`) and made durable (`_sync_written`), how writers
exclude each other (`_locked`) and how it catches up with other writers (`_refresh`); the checks,
the rules of log.py and the shape of each record live here, so the JSON-lines file and the
in-memory store cannot drift apart.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .base import PromiseStore
from .codec import normalize, unstorable_part
from .errors import UnstorableValueError
from .log import Entry, check_attempt, check_create, check_error, check_reopen, check_settle, snapshot
from .promise import Promise, State

T = TypeVar("T")


class IndexedStore(PromiseStore):
    """The PromiseStore contract over `self._index` (promise id -> log.Entry)."""

    _index: dict[str, Entry]
    _mutex: threading.RLock  # guards the index against the process's other threads
    _deferred = False  # a deferred settle may still wait for a sync

    # -- the contract ----------------------------------------------------------------------

    def create(self, promise_id: str, param: Any) -> Promise:
        self._check(promise_id)
        param = storable(promise_id, "param", param)
        self._refresh()
        entry = self._index.get(promise_id)
        if entry is not None:  # the common case on replay: no store lock needed to read
            check_create(entry, promise_id, param)
            return snapshot(promise_id, entry)
        return self._locked(self._create, promise_id, param)

    def start_attempt(self, promise_id: str) -> int:
        self._check(promise_id)
        return self._locked(self._start_attempt, promise_id)

    def resolve(
        self, promise_id: str, value: Any, *, defer_sync: bool = False, hold: bool = False
    ) -> Promise:
        """A held settle is written at once here: a file's settle costs its sync either way."""
        self._check(promise_id)
        value = storable(promise_id, "value", value)
        promise = self._locked(self._settle, promise_id, State.RESOLVED, value)
        self._durable(defer_sync)
        return promise

    def reject(
        self, promise_id: str, error: dict[str, Any] | BaseException, *, defer_sync: bool = False
    ) -> Promise:
        self._check(promise_id)
        error = storable_error(promise_id, error)
        promise = self._locked(self._settle, promise_id, State.REJECTED, error)
        self._durable(defer_sync)
        return promise

    def reopen(self, promise_id: str, reason: str) -> Promise:
        self._check(promise_id)
        promise = self._locked(self._reopen, promise_id, reason)
        self._durable(False)
        return promise

    def sync(self) -> None:
        self._check_open()
        self._sync_written()

    def get(self, promise_id: str) -> Promise | None:
        self._check(promise_id)
        self._refresh()
        entry = self._index.get(promise_id)
        return None if entry is None else snapshot(promise_id, entry)

    def list(self, prefix: str = "") -> list[Promise]:
        self._check_open()
        with self._mutex:
            self._refresh()
            return [snapshot(pid, e) for pid, e in self._index.items() if pid.startswith(prefix)]

    # -- under the backend's lock, with the index caught up ----------------------------------

    def _create(self, promise_id: str, param: Any) -> Promise:
        entry = self._index.get(promise_id)
        if entry is not None:
            check_create(entry, promise_id, param)
            return snapshot(promise_id, entry)
        return self._append_create({"op": "create", "id": promise_id, "param": param, "t": time.time()})

    def _start_attempt(self, promise_id: str) -> int:
        n = check_attempt(self._index.get(promise_id), promise_id)
        self._append_attempt({"op": "attempt", "id": promise_id, "n": n, "t": time.time()})
        return n

    def _settle(self, promise_id: str, state: State, outcome: Any) -> Promise:
        entry = self._index.get(promise_id)
        if not check_settle(entry, promise_id, state, outcome):
            return snapshot(promise_id, entry)
        if state is State.RESOLVED:
            record = {"op": "resolve", "id": promise_id, "value": outcome, "t": time.time()}
        else:
            record = {"op": "reject", "id": promise_id, "error": outcome, "t": time.time()}
        return self._append(record)

    def _reopen(self, promise_id: str, reason: str) -> Promise:
        check_reopen(self._index.get(promise_id), promise_id, reason)
        record = {"op": "reopen", "id": promise_id, "reason": reason, "t": time.time()}
        return self._append(record)

    def _durable(self, deferred: bool) -> None:
        """After a settle: sync now, or remember that a deferred one waits for a sync."""
        if deferred:
            self._deferred = True
        else:
            self._sync_written()

    # -- what a backend provides ---------------------------------------------------------------

    @abc.abstractmethod
    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` excluding every other writer, with the index caught up first."""

    @abc.abstractmethod
    def _refresh(self) -> None:
        """Fold into the index what other writers added since (a no-op for a sole writer);
        safe to call from several threads at once."""

    @abc.abstractmethod
    def _append(self, record: dict[str, Any]) -> Promise:
        """Keep `record` (not yet durably), fold it into the index, return the promise."""

    @abc.abstractmethod
    def _sync_written(self) -> None:
        """Make every record kept so far durable; threads settling together share one sync."""

    def _append_create(self, record: dict[str, Any]) -> Promise:
        return self._append(record)

    def _append_attempt(self, record: dict[str, Any]) -> None:
        self._append(record)


def storable_error(promise_id: str, error: dict[str, Any] | BaseException) -> dict[str, Any]:
    """A rejection's error as the store keeps it: an exception as its type and message; else a
    JSON object (TypeError for anything else, UnstorableValueError for what JSON cannot hold)."""
    if isinstance(error, BaseException):
        error = {"type": type(error).__name__, "message": str(error)}
    error = storable(promise_id, "error", error)
    check_error(promise_id, error)
    return error


def storable(promise_id: str, what: str, value: Any) -> Any:
    """The value as the store will give it back, or UnstorableValueError saying where it fails."""
    try:
        return normalize(value)
    except TypeError:
        raise UnstorableValueError(promise_id, what, unstorable_part(value)) from None
