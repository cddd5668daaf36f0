"""Errors raised by promise stores: each names the file, line or promise a user can act on."""

from __future__ import annotations

from pathlib import Path


class StoreError(Exception):
    """Base class of every store failure; the runtime never retries or settles on these."""


class StoreCorruptedError(StoreError):
    """A damaged line before the last one: the file is left untouched for a human to inspect."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: store is damaged ({reason}); the file was left untouched")
        self.path = path
        self.line = line
        self.reason = reason


class StoreLockedError(StoreError):
    """Another process holds the store for writing."""

    def __init__(self, path: Path, owner: str) -> None:
        super().__init__(f"{path}: store is held by another worker ({owner})")
        self.path = path
        self.owner = owner


class StoreWriteError(StoreError):
    """An append or a sync failed; the caller was told nothing succeeded."""


class StoreUnavailableError(StoreError):
    """The store cannot be used from this process now, though nothing is wrong with it: its
    database is down or the connection was lost (a write in flight may or may not have been
    committed), or this process lost its lease to another driver. Running again, which reads
    the store anew, may go on."""


class UnstorableValueError(TypeError):
    """A param, value or error JSON cannot hold; nothing was written. The caller's mistake, not
    the store's, so a TypeError."""

    def __init__(self, promise_id: str, what: str, where: str) -> None:
        super().__init__(f"promise {promise_id}: {what} cannot be stored as JSON: {where}")
        self.promise_id = promise_id
        self.where = where


class PromiseNotFoundError(StoreError, KeyError):
    def __init__(self, promise_id: str) -> None:
        super().__init__(promise_id)
        self.promise_id = promise_id

    def __str__(self) -> str:
        return f"no promise with id {self.promise_id!r}"


class PromiseConflictError(StoreError):
    """The same id asked for with another param, or settled twice with different outcomes."""

    def __init__(self, promise_id: str, message: str) -> None:
        super().__init__(f"promise {promise_id}: {message}")
        self.promise_id = promise_id


class WorkflowBusyError(StoreError):
    """Another process drives this root workflow: a second driver never runs its steps."""

    def __init__(self, root_id: str, owner: str) -> None:
        super().__init__(
            f"workflow {root_id} is being run by another process ({owner}); "
            "wait for it to finish, or stop it first"
        )
        self.root_id = root_id
        self.owner = owner
