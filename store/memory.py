"""An in-memory promise store: the contract without a disk, for tests and examples.

It keeps the same rules and JSON-exact values as the file (it shares their code), so what runs
on it runs the same on the JSON-lines store; it keeps nothing once the process ends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .errors import WorkflowBusyError
from .indexed import IndexedStore
from .log import Entry, apply, snapshot
from .promise import Promise

T = TypeVar("T")


class MemoryStore(IndexedStore):
    """Durable promises for as long as the process lives; threads may share one."""

    def __init__(self, *, lock_timeout: float = 30.0) -> None:
        self._index: dict[str, Entry] = {}
        self._mutex = threading.RLock()
        self._owner_left = threading.Condition(self._mutex)
        self._owners: dict[str, str] = {}  # root id -> the thread driving it
        self._lock_timeout = lock_timeout
        self._cancels: set[str] = set()  # roots an operator asked to cancel

    def own(self, root_id: str) -> contextlib.AbstractContextManager[None]:
        return self._owning(root_id)

    def request_cancel(self, root_id: str) -> None:
        self._check(root_id)
        with self._mutex:
            self._cancels.add(root_id)

    def cancel_requested(self, root_id: str) -> bool:
        self._check(root_id)
        return root_id in self._cancels

    def withdraw_cancel(self, root_id: str) -> None:
        self._check(root_id)
        with self._mutex:
            self._cancels.discard(root_id)

    def close(self) -> None:
        """Nothing to release; like every store, a closed one refuses further calls."""
        self._closed = True

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._index)} promises)"

    @contextlib.contextmanager
    def _owning(self, root_id: str) -> Iterator[None]:
        me = f"thread {threading.current_thread().name}"
        with self._mutex:
            if not self._owner_left.wait_for(lambda: root_id not in self._owners, self._lock_timeout):
                raise WorkflowBusyError(root_id, self._owners[root_id])
            self._owners[root_id] = me
        try:
            yield
        finally:
            with self._mutex:
                del self._owners[root_id]
                self._owner_left.notify_all()

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._mutex:
            return fn(*args)

    def _refresh(self) -> None:
        """Every write goes through this object: the index is always current."""

    def _append(self, record: dict[str, Any]) -> Promise:
        apply(self._index, record)
        return snapshot(record["id"], self._index[record["id"]])

    def _sync_written(self) -> None:
        """Nothing outlives the process: there is nothing to sync."""
