"""Steps run by a fleet: executors on any machine claim them from PostgreSQL.

Two sides of one queue (store/pg_tasks.py):

- `Fleet`, the driver's executor: a step the workflow begins is enqueued as a task, and the
  step thread waiting for it learns its outcome from the store, like a replay. The driver never
  runs or settles those steps itself.
- `Executor`, one per executor process: claims a task, runs its function in a transaction that
  also marks the task done and resolves the promise (`current_step().transaction`), so a step's
  writes there and its resolve commit together. A failure is retried with the step's policy
  (the task becomes ready again after the backoff) or rejects the promise; a claim that expired
  (this executor was stopped) commits nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from store import Promise, StoreError, StoreUnavailableError
from store.owners import this_owner
from store.pg import PgStore
from store.pg_tasks import Claim, ClaimLostError

from .context import StepInfo
from .errors import PermanentError, WorkflowInterrupted, failure_record
from .executor import StepExecutor, call_as_step
from .registry import describe, lookup
from .retry import RetryPolicy

log = logging.getLogger("workflow.fleet")

POLL_S = 0.02  # how often an idle executor looks for a task, and the driver for outcomes
STOP_POLL_S = 0.25  # how often a driver waiting for a step asks whether to stop
REAP_EVERY_S = 1.0  # how often an executor looks for claims of dead executors of its machine
UNAVAILABLE_PAUSE_S = 1.0  # an executor's pause when the database cannot be reached


class AttemptsExhaustedError(PermanentError):
    """Every attempt of a step was used up; the last ones died with their executors."""


def task_spec(policy: RetryPolicy) -> dict[str, Any]:
    """What an executor needs besides the promise's param: the step's retry policy."""
    return {
        "max_attempts": policy.max_attempts, "initial": policy.initial, "factor": policy.factor,
        "max_interval": policy.max_interval, "timeout": policy.timeout,
        "non_retryable": [_name(t) for t in policy.non_retryable],
    }


class Fleet(StepExecutor):
    """The driver's side: `capacity` steps in flight on the fleet at once; each waits in a step
    thread of the runner for its promise to be settled by an executor."""

    settles = True

    def __init__(self, store: PgStore, capacity: int, *, poll_s: float = POLL_S,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.store = store
        self.capacity = capacity
        self._should_stop = should_stop
        self._poll_s = poll_s
        self._waiting: dict[str, threading.Event] = {}
        self._settled: dict[str, Promise] = {}
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()
        self._failure: BaseException | None = None

    def run(self, info: StepInfo, fn: Callable[..., Any], args: tuple[Any, ...],
            kwargs: dict[str, Any], timeout: float | None) -> Any:
        """Not here: a fleet runs and settles its steps elsewhere (see settle_remotely)."""
        raise TypeError("a Fleet settles the steps it runs: the runner calls settle_remotely()")

    def settle_remotely(self, promise_id: str, policy: RetryPolicy) -> Promise:
        """Enqueue the step `promise_id` and wait until an executor settles it."""
        self.store.enqueue(promise_id, task_spec(policy))
        event = threading.Event()
        with self._lock:
            self._waiting[promise_id] = event
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="fleet-watch", daemon=True)
                self._watcher.start()
        try:
            while not event.wait(STOP_POLL_S):
                if self._failure is not None:
                    raise self._failure
                if self._closed.is_set():
                    raise StoreError(f"the fleet closed while {promise_id} waited")
                if self._should_stop():  # its executors stop too; whoever drives next waits for it
                    raise WorkflowInterrupted(f"stopped while {promise_id} ran on the fleet; run again")
        finally:
            with self._lock:
                self._waiting.pop(promise_id, None)
        with self._lock:
            return self._settled.pop(promise_id)

    def _watch(self) -> None:
        """One query for every step waited for, each poll: wake those that were settled."""
        while not self._closed.wait(self._poll_s):
            with self._lock:
                ids = list(self._waiting)
            if not ids:
                continue
            try:
                settled = self.store.settled(ids)
            except StoreError as exc:  # every waiter raises it; the driver ends
                self._failure = exc
                return
            with self._lock:
                for promise in settled:
                    if promise.id in self._waiting:
                        self._settled[promise.id] = promise
                        self._waiting.pop(promise.id).set()

    def close(self) -> None:
        self._closed.set()
        if self._watcher is not None:
            self._watcher.join()


class Executor:
    """One executor: claims steps of the root workflows `roots` and runs them, one at a time."""

    def __init__(
        self,
        store: PgStore,
        roots: list[str],
        dependencies: Mapping[str, Any],
        *,
        claim_s: float | None = None,
        poll_s: float = POLL_S,
        on_step: Callable[[str, Claim], None] | None = None,
    ) -> None:
        self.store = store
        self.roots = roots
        self.dependencies = dependencies
        self.claim_s = store.lease_s if claim_s is None else claim_s  # as long as a driver's lease
        self.poll_s = poll_s
        self.name = this_owner()
        self._on_step = on_step or (lambda kind, claim: None)

    def run_until(self, done: Callable[[], bool]) -> int:
        """Claim and run steps until `done()` (asked when none is ready); the number run.
        While idle, it also frees the claims of this machine's executors that died."""
        ran = 0
        next_reaping = 0.0
        while True:
            try:
                if time.monotonic() >= next_reaping:
                    self.store.release_claims_of_the_dead(self.roots)
                    next_reaping = time.monotonic() + REAP_EVERY_S
                claim = self.store.claim(self.roots, self.name, self.claim_s)
                if claim is None:
                    if done():
                        return ran
                    time.sleep(self.poll_s)
                    continue
                self.execute(claim)
            except StoreUnavailableError as exc:  # the database away: its claims expire meanwhile
                log.warning("%s: %s; trying again in %g s", self.name, exc, UNAVAILABLE_PAUSE_S)
                time.sleep(UNAVAILABLE_PAUSE_S)
                continue
            ran += 1

    def execute(self, claim: Claim) -> None:
        """Run one claimed step to its settle (or to a retry later); never raises for the
        step's own failure."""
        if claim.settled:
            self.store.drop_claim(claim)  # its promise was settled already: nothing to run
            return
        policy = _policy(claim.spec)
        if claim.attempt is None:  # every attempt was used, the last ones cut short
            self.store.fail_claim(claim, failure_record(AttemptsExhaustedError(
                f"all {policy.max_attempts} attempts were used; the last ones were cut short"
            ), claim.attempts), None)
            return
        entry = describe(lookup(claim.param["fn"], claim.param["v"]))
        self._on_step("started", claim)
        renewing = _Renewal(self.store, claim, self.claim_s)
        try:
            with self.store.step_transaction(claim) as conn:
                info = StepInfo(claim.promise_id, claim.attempt, entry.name, self.dependencies,
                                entry.version, transaction=conn)
                value = call_as_step(info, entry.fn, tuple(claim.param["args"]),
                                     claim.param.get("kwargs", {}), policy.timeout)
                self.store.finish_claim(conn, claim, value)
        except ClaimLostError:
            log.warning("%s: the claim of %s expired meanwhile; nothing was committed",
                        self.name, claim.promise_id)
            return
        except Exception as exc:
            self._failed(claim, exc, _retryable(claim.spec, policy, exc) and
                         claim.since_reopen < policy.max_attempts, policy)
            return
        finally:
            renewing.stop()
        self._on_step("resolved", claim)

    def _failed(self, claim: Claim, exc: Exception, retry: bool, policy: RetryPolicy) -> None:
        delay = _delay(policy, claim.since_reopen) if retry else None
        log.warning("step %s (%s) failed with '%s: %s' (attempt %d; %s)", claim.param["fn"],
                    claim.promise_id, type(exc).__name__, exc, claim.since_reopen,
                    f"retrying in {delay:g} s" if retry else "rejected")
        self.store.fail_claim(claim, failure_record(exc, claim.attempts), delay)
        self._on_step("retrying" if retry else "rejected", claim)


class _Renewal:
    """Renews a claim a few times per claim period until stopped."""

    def __init__(self, store: PgStore, claim: Claim, claim_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, args=(store, claim, claim_s),
                                        name="claim", daemon=True)
        self._thread.start()

    def _renew(self, store: PgStore, claim: Claim, claim_s: float) -> None:
        while not self._stop.wait(claim_s / 3):
            try:
                if not store.renew_claim(claim, claim_s):
                    return  # lost: the step's commit will find it out
            except StoreError as exc:
                log.warning("could not renew the claim of %s (%s)", claim.promise_id, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _policy(spec: dict[str, Any]) -> RetryPolicy:
    return RetryPolicy(max_attempts=spec["max_attempts"], initial=spec["initial"], factor=spec["factor"],
                       max_interval=spec["max_interval"], timeout=spec["timeout"])


def _retryable(spec: dict[str, Any], policy: RetryPolicy, exc: Exception) -> bool:
    """As the policy says, with its non-retryable types known by name (they crossed machines)."""
    names = {_name(t) for t in type(exc).__mro__}
    return policy.retryable(exc) and not names & set(spec["non_retryable"])


def _name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _delay(policy: RetryPolicy, attempt: int) -> float:
    """The backoff after failed attempt `attempt` (1, 2, ...), as the runner's tenacity waits."""
    try:
        return min(policy.max_interval, policy.initial * policy.factor ** (attempt - 1))
    except OverflowError:
        return policy.max_interval
