"""The promise store interface and its contract, written once.

Every backend (the JSON-lines file, the in-memory store, a PostgreSQL store) implements
`PromiseStore` and passes the same contract suite (tests/store/test_contract.py);
`backends.open_store(url)` picks one. The contract:

- **Ids.** A promise id is a non-empty `str`; a root workflow's id has no `.` (`workflow/ids.py` owns
  the format). Anything else is a TypeError before anything is written.
- **Values.** `param`, `value` and `error` are JSON documents, stored and compared JSON-exactly:
  what comes back is what `normalize()` makes of the value (a tuple comes back a list, a
  datetime an ISO string, a dataclass a dict), and `True` is not `1` nor `1.0`. A value JSON
  cannot hold (a set, an object, a dict with non-str keys, an int beyond 64 bits, nesting
  deeper than 254 levels) raises `UnstorableValueError` (a TypeError) naming the promise and the
  path in the value, and nothing is written.
- **create** is idempotent: the same id with the same param returns the existing promise,
  whatever its state; another param raises `PromiseConflictError`.
- **start_attempt** counts attempts of a *pending* promise (1, 2, ...); on a settled one it
  raises `PromiseConflictError`, on an unknown one `PromiseNotFoundError`.
- **resolve / reject** settle a pending promise. Settling again with the same outcome is a
  no-op; with another outcome, a `PromiseConflictError`. A resolved promise never changes again.
- **reopen** makes a *rejected* promise pending again with a fresh attempt budget (an
  operator's retry); `attempts` keeps counting, `attempts_at_reopen` marks where the budget
  restarted. Anything but a rejected promise raises `PromiseConflictError`.
- **get / list** read: `get` returns None for an unknown id; `list(prefix)` returns the
  promises whose id starts with `prefix`, in creation order.
- **Durability.** When `resolve`, `reject` or `reopen` return, the settle survives a process
  kill and (unless the store was opened with durability "none") a power loss. Settles made
  together by several threads share one sync (group commit). A settle made with
  `defer_sync=True` survives a process kill at once and a power loss only after the next
  `sync()`, the next settle that is not deferred, or `close()`: for a step whose effect is
  durable elsewhere and can be found again (a recover function), not for the only record. Attempts survive
  a process kill at once and reach the disk with the next settle. So do creations, except that
  an exclusive JSON-lines store holds a creation back until its next write (so a step's creation
  and first attempt are one line): a creation lost with its process is made again by the replay.
  A resolve made with `hold=True` by the owner of its root may be held back for a moment (on
  PostgreSQL at most ~2 ms) to be written with the store's next write under that root, in one
  transaction with it (a step's settle with the next step's creation: one commit per step),
  and always before that write; else on its own, or by `sync()`, `close()` or the end of
  `own()`. A kill before it is written loses it, and the replay runs that step again, as after
  a kill just before its settle.
- **Values handed out** (`param`, `value`, `error` of a Promise) may be the store's own cached
  objects: treat them as read-only (the runner gives workflow code copies).
- **Cancel requests.** `request_cancel(root_id)` records that an operator asked the workflow to
  stop for good; `cancel_requested(root_id)` tells whether one is recorded; `withdraw_cancel`
  removes it (an operator's retry). They work from any process, on a store opened read-only too,
  while another process holds the store or drives the workflow: a request is not a promise and
  takes no lock (the driver asks for it between steps, and settles the root itself). When
  `request_cancel` or `withdraw_cancel` return, the change survives a kill and a power loss;
  both are idempotent.
- **Ownership.** `own(root_id)` is held by whoever drives that workflow (runs and settles its
  steps). A second owner waits up to the store's lock timeout, then gets `WorkflowBusyError`
  naming the holder: it never runs anything beside the first.
- **Threads.** One store object may be used by several threads of its process at once.
- **Failure.** Every failure of the store itself is a `StoreError` (`StoreWriteError` when a
  write or sync failed: nothing was written, or the store refuses further writes until it is
  opened again; `StoreCorruptedError` naming file and line for damaged or impossible history).
- **Lifetime.** `close()` is idempotent; a store is a context manager that closes on exit; a
  closed store refuses every call with `StoreError`.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any

from .errors import StoreError
from .log import check_id
from .promise import Promise


class PromiseStore(abc.ABC):
    """Durable promises, as the workflow runtime uses them (the contract is the module's doc)."""

    holds_settles = False  # whether `resolve(hold=True)` may hold a settle back (see the contract)

    @abc.abstractmethod
    def create(self, promise_id: str, param: Any) -> Promise:
        """Create a pending promise, or return the existing one if it has the same param."""

    @abc.abstractmethod
    def start_attempt(self, promise_id: str) -> int:
        """Record that an attempt of a pending promise begins; return its number (1, 2, ...)."""

    @abc.abstractmethod
    def resolve(
        self, promise_id: str, value: Any, *, defer_sync: bool = False, hold: bool = False
    ) -> Promise:
        """Settle with a value, durably (or with the next sync, or with the next write); the same
        value again is a no-op."""

    @abc.abstractmethod
    def reject(
        self, promise_id: str, error: dict[str, Any] | BaseException, *, defer_sync: bool = False
    ) -> Promise:
        """Settle with an error (a dict, or an exception described as type and message)."""

    @abc.abstractmethod
    def sync(self) -> None:
        """Make every write made so far durable (the deferred settles among them)."""

    @abc.abstractmethod
    def reopen(self, promise_id: str, reason: str) -> Promise:
        """Make a rejected promise pending again (an operator's retry); the log keeps the error."""

    @abc.abstractmethod
    def get(self, promise_id: str) -> Promise | None:
        """The promise, or None if there is none with this id."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[Promise]:
        """Promises whose id starts with `prefix`, in creation order."""

    @abc.abstractmethod
    def own(self, root_id: str) -> contextlib.AbstractContextManager[None]:
        """Hold the right to drive the workflow `root_id`; WorkflowBusyError if another has it."""

    @abc.abstractmethod
    def request_cancel(self, root_id: str) -> None:
        """Record, durably, that the workflow `root_id` is asked to stop for good."""

    @abc.abstractmethod
    def cancel_requested(self, root_id: str) -> bool:
        """Whether a cancel of `root_id` is recorded (and not withdrawn)."""

    @abc.abstractmethod
    def withdraw_cancel(self, root_id: str) -> None:
        """Remove a recorded cancel of `root_id`, durably; a no-op without one."""

    def compact(self) -> None:  # noqa: B027  (optional: a store with nothing to reclaim)
        """Reclaim the space of superseded records, atomically; a no-op where there is none."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store's resources (files, locks, connections); idempotent."""

    # -- what every backend checks first ---------------------------------------------------------

    _closed = False  # a closed store refuses every call, whatever the backend

    def _check(self, promise_id: Any) -> None:
        """The store is open and `promise_id` can be an id."""
        self._check_open()
        check_id(promise_id)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self!r} is closed")

    def __enter__(self) -> PromiseStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

