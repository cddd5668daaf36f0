"""Drives workflows: replays stored results, executes what is missing, retries, persists.

A root call and every call it yields become promises. A settled promise is never executed
again: its value is sent back into the generator (or its error thrown there). A pending one is
executed: a generator function is driven the same way (a sub-workflow), a plain function is a
step, run with durable attempts and retried with backoff.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, NoReturn

from store import (
    Promise,
    PromiseConflictError,
    PromiseNotFoundError,
    PromiseStore,
    State,
    StoreError,
    WorkflowBusyError,
    failpoints,
    normalize,
    same_json,
)

from .context import Begin, Call, Context, Gather, Handle, MapCall, StepInfo
from .errors import (
    EngineError,
    NonDeterminismError,
    StepError,
    VersionNotRegisteredError,
    WorkflowCancelled,
    WorkflowConflictError,
    WorkflowInterrupted,
    WorkflowUsageError,
    cancellation_record,
    failure_record,
    is_cancellation,
)
from .executor import StepExecutor, StepProcessLost, call_as_step
from .ids import check_root_id, child_id, children_prefix, is_root, patch_marker_id
from .patches import Patch
from .pool import ProcessPool, Setup
from .registry import Registered, describe, registered, versions
from .retry import RetryPolicy

log = logging.getLogger("workflow.runner")


@dataclass(frozen=True, slots=True)
class StepEvent:
    """What the runner reports as it goes: replayed, started, recovered, retrying, resolved,
    rejected."""

    kind: str
    promise_id: str
    fn: str
    attempt: int | None = None
    error: str | None = None
    delay: float | None = None


_STOP_POLL_S = 0.1
_CANCEL_POLL_S = 0.2  # how often a run asks the store whether it was cancelled (between steps)
_PRUNE_BEGUN_AT = 64  # begun calls a workflow keeps track of before it forgets the ended ones
_RECOVER_TRIES = 3  # looks for a dead attempt's effect, each in a step process that may be killed


class ObserverError(EngineError):
    """The `on_event` callback raised: the run stops there, and a step whose start it was
    reporting is not run (nor settled)."""


class AttemptsExhaustedError(Exception):
    """Every attempt of the budget was started and none finished (each one's process died)."""


class Runner:
    """Runs workflows over a promise store.

    `dependencies` are handed to steps through `current_step().dependency(name)`;
    `on_event` receives a StepEvent per step transition; `should_stop` is asked before each new
    step and, when true, ends the run with WorkflowInterrupted (nothing is settled). A cancel
    request in the store (`cancel`) is looked for there too (at most every 0.2 s), and once more
    at the root's end, after the calls it began have ended and before it is resolved: the steps
    in flight end, no new one starts, and the root is rejected as cancelled (WorkflowCancelled).

    `workers` > 1 runs the calls a workflow begins concurrently (`ctx.begin`, `ctx.map`) in a
    pool of that many step processes (pool.py), each with the dependencies `setup` gives it
    (or a forked copy of `dependencies`; without `dependencies`, the driver enters `setup` too);
    their settles share syncs (group commit). With one worker, begun calls run in the driver,
    one after the other, when the workflow waits for one of them, and the calls run by one wait
    are settled with one sync.
    """

    def __init__(
        self,
        store: PromiseStore,
        *,
        retry: RetryPolicy | None = None,
        dependencies: Mapping[str, Any] | None = None,
        on_event: Callable[[StepEvent], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        sleep: Callable[[float], Any] = time.sleep,
        workers: int = 1,
        setup: Setup | None = None,
        fleet: StepExecutor | None = None,
    ) -> None:
        if type(workers) is not int or workers < 1:
            raise ValueError(f"workers must be a whole number of at least 1, not {workers!r}")
        self.store = store
        self.policy = retry or RetryPolicy()
        self.dependencies = dict(dependencies or {})
        self.workers = workers
        self._fleet = fleet
        self._setup = setup
        self._on_event = on_event
        self._should_stop = should_stop
        self._sleep = sleep
        self._runs = threading.local()  # `.state`: the _RunState of the run this thread serves
        self._active: set[_RunState] = set()  # the runs in progress (threads may drive several)

    def run(self, root_id: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run (or resume, or just return the stored result of) the workflow `root_id`."""
        check_root_id(root_id)
        entry = describe(fn)
        if not entry.is_workflow:
            raise WorkflowUsageError(
                f"{entry.name} is not a workflow: a workflow is a generator function taking "
                "a Context first (`def wf(ctx, ...): ... yield ctx.run(step, ...)`)"
            )
        with (
            self.store.own(root_id),  # one driver per workflow, before anything runs
            self._driver_dependencies() as dependencies,
            self._step_processes(_RunState(dependencies, _CancelWatch(self.store, root_id))),
        ):
            try:
                result = self._call(Call(root_id, fn, args, kwargs, None), root=True)
            except WorkflowCancelled:  # seen between steps: those in flight have ended
                self._settle_cancelled(root_id)
                raise
            except StepError as exc:
                if exc.promise_id == root_id and is_cancellation(exc.error):
                    raise WorkflowCancelled(root_id) from None
                raise
            if self.store.cancel_requested(root_id):  # it finished before it saw the request
                self.store.withdraw_cancel(root_id)
            return result

    @contextlib.contextmanager
    def _driver_dependencies(self) -> Iterator[dict[str, Any]]:
        """Given `setup`, no `dependencies` and no pool, the driver's steps get theirs from
        `setup` (with a pool, every step runs in a step process, which enters `setup` itself)."""
        if self._setup is None or self.dependencies or self.workers > 1 or self._fleet is not None:
            yield self.dependencies
            return
        with self._setup() as dependencies:
            yield dict(dependencies)

    @property
    def _run(self) -> _RunState:
        return self._runs.state

    def stalled_step_processes(self, limit_s: float) -> list[int]:
        """The pids of step processes silent for `limit_s` seconds (none without a pool)."""
        return sorted(pid for run in list(self._active) if isinstance(run.pool, ProcessPool)
                      for pid in run.pool.stalled(limit_s))

    @contextlib.contextmanager
    def _step_processes(self, run: _RunState) -> Iterator[None]:
        """The run's state for this thread, and its pool and step threads (forked before any
        step thread exists)."""
        if self._fleet is not None:
            run.pool = self._fleet
        elif self.workers > 1:
            run.pool = ProcessPool(self.workers, setup=self._setup, dependencies=run.dependencies)
        if run.pool is not None:
            run.threads = ThreadPoolExecutor(
                run.pool.capacity, thread_name_prefix="step", initializer=self._serve, initargs=(run,)
            )
        outer = getattr(self._runs, "state", None)  # a Runner may run again inside a step
        self._runs.state = run
        self._active.add(run)
        try:
            yield
        finally:
            self._active.discard(run)
            self._runs.state = outer
            if run.pool is not None:
                # The pool first: a replacement step process dies with the thread that forked it.
                run.pool.close()
                run.threads.shutdown(wait=True, cancel_futures=True)

    def _serve(self, run: _RunState) -> None:
        """A step thread's start: it serves `run`."""
        self._runs.state = run
        self._runs.in_step_thread = True

    def retry(self, root_id: str) -> list[str]:
        """Make a failed (or cancelled) workflow runnable again; return the reopened ids (the
        root last).

        The rejected calls under `root_id` and the root itself become pending with a fresh
        attempt budget (their errors stay in the store's history); resolved calls stay final,
        so the next `run` replays them and resumes at the first reopened call. A cancel request
        is withdrawn first (until the root is reopened, a crash leaves it cancelled). It is the
        same operation as `python -m supervisor retry`.
        """
        with self.store.own(root_id):
            root = self.store.get(root_id)
            if root is None:
                raise PromiseNotFoundError(root_id)
            if root.state is not State.REJECTED:
                raise PromiseConflictError(
                    root_id, f"is {root.state.value}; only a failed (rejected) workflow can be retried"
                )
            self.store.withdraw_cancel(root_id)
            reopened = [p.id for p in self.store.list(children_prefix(root_id)) if p.state is State.REJECTED]
            reopened.append(root_id)
            for promise_id in reopened:  # the root last: until then, a crash leaves it failed
                self.store.reopen(promise_id, "retry")
        return reopened

    def cancel(self, root_id: str) -> bool:
        """Cancel the workflow `root_id`: record the request in the store, and settle the root as
        cancelled now if no one drives it (True); else its driver does at its next step boundary
        (False). A cancelled workflow is cancelled again without a word; a finished or failed
        one is a PromiseConflictError, an unknown one a PromiseNotFoundError.
        """
        check_root_id(root_id)
        root = self.store.get(root_id)
        if root is None:
            raise PromiseNotFoundError(root_id)
        if root.state is State.REJECTED and is_cancellation(root.error):
            return True
        if root.state is not State.PENDING:
            done = "finished" if root.state is State.RESOLVED else "failed (retry it instead)"
            raise PromiseConflictError(root_id, f"is {root.state.value}: it {done}; only a pending "
                                       "workflow can be cancelled")
        self.store.request_cancel(root_id)
        try:
            with self.store.own(root_id):
                self._settle_cancelled(root_id)
        except WorkflowBusyError:
            return False
        return True

    def _settle_cancelled(self, root_id: str) -> None:
        """Reject a pending root as cancelled, durably (the request stays until a retry)."""
        root = self.store.get(root_id)
        if root is not None and root.state is State.PENDING:
            self.store.reject(root_id, cancellation_record())

    def _raise_if_stopping(self, before: str | None = None) -> None:
        """Between steps (before the step `before`, or in a retry backoff): end the run if it was
        asked to stop (a signal), or cancelled."""
        if self._should_stop is not None and self._should_stop():
            where = "during a retry backoff" if before is None else f"before {before}"
            raise WorkflowInterrupted(f"stopped {where}; run again to resume")
        cancel = self._run.cancel
        if cancel is not None and cancel.requested():
            raise WorkflowCancelled(cancel.root_id)

    def _raise_if_cancelled_at_end(self, promise_id: str) -> None:
        """The root's end, once the calls it began have ended, is a step boundary too: a cancel
        requested by then (asked of the store now, not at the watch's last look) cancels it."""
        cancel = self._run.cancel
        if cancel is not None and promise_id == cancel.root_id and cancel.requested(now=True):
            raise WorkflowCancelled(promise_id)

    # -- one durable call ------------------------------------------------------------------

    def _call(self, call: Call, root: bool = False) -> Any:
        entry, promise = self._prepare(call, root)
        return self._finish(call, entry, promise)

    def _prepare(self, call: Call, root: bool = False) -> tuple[Registered, Promise]:
        """The call's promise, created or checked against what the history recorded there."""
        entry = describe(call.fn)
        promise = self.store.get(call.promise_id)
        if entry.is_workflow:
            entry = self._version_to_drive(call.promise_id, entry, promise)
        param = {"fn": entry.name, "v": entry.version, "args": call.args}
        if call.kwargs:
            param["kwargs"] = call.kwargs
        if promise is None:
            promise = self.store.create(call.promise_id, param)
        else:
            self._check_same_call(promise, entry, param, root)
        return entry, promise

    def _finish(self, call: Call, entry: Registered, promise: Promise) -> Any:
        """The call's result: replayed from its promise, or driven or executed now."""
        if promise.state is State.RESOLVED:
            self._emit("replayed", call, entry)
            return _own(promise.value)
        if promise.state is State.REJECTED:
            self._emit("replayed", call, entry)
            raise StepError(call.promise_id, entry.name, promise.error)
        if entry.is_workflow:
            return self._drive(call, entry)
        self._raise_if_stopping(call.promise_id)
        return self._execute_step(call, entry, promise)

    def _version_to_drive(
        self, promise_id: str, entry: Registered, promise: Promise | None
    ) -> Registered:
        """A workflow replays with the version it was recorded with (kept registered beside the
        new one); a new run starts with the function it was called with."""
        if promise is None:
            return entry
        recorded = promise.param
        if not isinstance(recorded, dict) or recorded.get("fn") != entry.name:
            return entry  # another function: the same-call check names the difference
        version = recorded.get("v")
        if version == entry.version:
            return entry
        older = registered(entry.name, version) if type(version) is int else None
        if older is None:
            raise VersionNotRegisteredError(promise_id, entry.name, version, versions(entry.name))
        return older

    def _check_same_call(
        self, promise: Promise, entry: Registered, param: dict[str, Any], root: bool
    ) -> None:
        """Replay must meet the call that was recorded at this id, or refuse to go on."""
        stored = promise.param
        if same_json(stored, param):
            return
        if root:
            raise WorkflowConflictError(promise.id, stored, normalize(param))
        recorded = f"{stored.get('fn')} v{stored.get('v')}"
        if recorded != f"{entry.name} v{entry.version}":
            raise NonDeterminismError(promise.id, recorded, f"{entry.name} v{entry.version}")
        raise NonDeterminismError(
            promise.id,
            f"{recorded} with args {stored.get('args')}",
            f"{entry.name} v{entry.version} with args {normalize(param['args'])}",
        )

    # -- workflows -------------------------------------------------------------------------

    def _drive(self, call: Call, entry: Registered) -> Any:
        """Step a generator through its durable calls, feeding back results or errors."""
        ctx = Context(call.promise_id, self._fleet.capacity if self._fleet else self.workers)
        try:
            gen = entry.fn(ctx, *call.args, **call.kwargs)
        except TypeError as exc:  # making a generator runs none of its code: the arguments
            raise WorkflowUsageError(f"workflow {entry.name} ({call.promise_id}): {exc}") from None
        send: Any = None
        throw: StepError | None = None
        begun: list[Handle] = []  # calls begun here: all end before this workflow does
        try:
            while True:
                try:
                    yielded = gen.send(send) if throw is None else gen.throw(throw)
                except StopIteration as done:
                    self._check_ended_cleanly(call, entry, ctx)
                    self._wait(begun)
                    self._raise_if_cancelled_at_end(call.promise_id)
                    return self._resolve(call, entry, done.value)
                except Exception as exc:  # the body raised, or let a StepError through
                    if isinstance(exc, EngineError | StoreError):
                        raise
                    self._check_ended_cleanly(call, entry, ctx)
                    self._wait(begun)
                    self._fail(call, entry, exc)
                kind = type(yielded)
                try:
                    if kind is Call:
                        ctx.take_yielded(yielded)
                        send, throw = self._call(yielded), None
                    elif kind is Begin:
                        ctx.take_yielded(yielded.call)
                        send, throw = self._begin(ctx, yielded.call, begun), None
                    elif kind is Handle:
                        send, throw = self._results(ctx, [yielded])[0], None
                    elif kind is Gather:
                        send, throw = self._results(ctx, list(yielded.handles)), None
                    elif kind is MapCall:
                        send, throw = self._map(ctx, yielded), None
                    elif kind is Patch:
                        send, throw = self._patched(ctx, yielded), None
                    else:
                        raise WorkflowUsageError(
                            f"workflow {entry.name} ({call.promise_id}) yielded {yielded!r}; "
                            "yield ctx.run(...), ctx.begin(...), a handle, ctx.gather(...) or "
                            "ctx.map(...) instead"
                        )
                except StepError as exc:
                    send, throw = None, exc
                except _ThrownIn as thrown:  # ctx.map's iterable raised: the workflow's own error
                    send, throw = None, thrown.exc
        finally:
            try:
                self._abandon(begun)
            finally:
                gen.close()

    # -- concurrent calls ------------------------------------------------------------------

    def _begin(self, ctx: Context, call: Call, begun: list[Handle]) -> Handle:
        """Start `call` without waiting: checked against the history now, run meanwhile."""
        entry, promise = self._prepare(call)
        if promise.state is not State.PENDING or entry.is_workflow:
            future = _Outcome()
            try:  # a replay, or a sub-workflow: its result now
                future.set_result(self._finish(call, entry, promise))
            except StepError as exc:
                future.set_exception(exc)
            return Handle(call.promise_id, future, ctx)
        handle = self._start(ctx, call, entry, promise)
        if len(begun) >= _PRUNE_BEGUN_AT and len(begun) & (len(begun) - 1) == 0:  # at powers of 2:
            begun[:] = [h for h in begun if not h.done()]  # a long import keeps no ended handles
        begun.append(handle)
        return handle

    def _start(self, ctx: Context, call: Call, entry: Registered, promise: Promise) -> Handle:
        """A pending call, handed to a step thread (a pool) or queued for the next wait."""
        run = self._run
        if run.threads is not None:
            future = run.threads.submit(self._finish, call, entry, promise)
            return Handle(call.promise_id, future, ctx)
        handle = Handle(call.promise_id, _Outcome(), ctx)
        run.queued.append((handle, call, entry, promise))
        return handle

    def _map(self, ctx: Context, m: MapCall) -> list[Any]:
        """One call per item, at most `m.concurrency` unfinished; every one runs to its end.

        Only the calls in flight have a handle: a replayed item costs no more than a `ctx.run`.
        """
        values: list[Any] = []
        failures: list[tuple[int, StepError]] = []
        running: dict[Handle, int] = {}  # -> its item's index
        items = zip(*m.iterables, strict=False)  # as map(): to the shortest
        unreadable: Exception | None = None
        synced_at = 0
        try:
            while True:
                try:
                    item = next(items)
                except StopIteration:
                    break
                except Exception as exc:  # the workflow's iterable failed: its own error, at its yield
                    unreadable = exc
                    break
                call = ctx.new_call(m.fn, item, {}, m.retry)
                entry, promise = self._prepare(call)
                values.append(None)
                if promise.state is not State.PENDING or entry.is_workflow:
                    try:
                        values[-1] = self._finish(call, entry, promise)
                    except StepError as exc:
                        failures.append((len(values) - 1, exc))
                    continue
                running[self._start(ctx, call, entry, promise)] = len(values) - 1
                if len(running) >= m.concurrency:
                    self._collect(running, values, failures, any_one=True)
                    if len(values) - synced_at >= m.concurrency:  # a long map: settles on disk
                        self._sync_owed()                          # a window at a time
                        synced_at = len(values)
            self._collect(running, values, failures, any_one=False)
        except BaseException:
            self._abandon(list(running))  # a fatal error: those in flight end first
            raise
        self._sync_owed()
        if unreadable is not None:
            raise _ThrownIn(unreadable)
        if failures:
            raise min(failures, key=lambda f: f[0])[1]
        return values

    def _collect(
        self, running: dict[Handle, int], values: list[Any], failures: list[tuple[int, StepError]],
        *, any_one: bool,
    ) -> None:
        """Wait for one (or all) of the running calls; move each ended one's value into place."""
        still = set(self._wait(list(running), any_one=any_one))
        for handle in [h for h in running if h not in still]:
            index = running.pop(handle)
            exc = handle._future.exception()
            if exc is None:
                values[index] = handle._future.result()
            else:
                failures.append((index, exc))

    def _results(self, ctx: Context, handles: list[Handle]) -> list[Any]:
        """The handles' values once all have ended; the first StepError among them is raised."""
        for handle in handles:
            if handle.parent is not ctx:
                raise WorkflowUsageError(
                    f"workflow {ctx.promise_id} waited for {handle.promise_id}, which another "
                    "workflow (or an earlier run) began: wait only for the handles you begin"
                )
        self._wait(handles)
        self._sync_owed()
        failed = next((h._future.exception() for h in handles if h._future.exception()), None)
        if failed is not None:
            raise failed
        return [h._future.result() for h in handles]

    def _wait(self, handles: list[Handle], *, any_one: bool = False) -> list[Handle]:
        """Wait for the handles (or, `any_one`, for one of them); return those still running.

        A failure of the engine or the store in one that ended (a stop request among them) is
        raised; a step's own failure (StepError) stays in its handle.
        """
        if self._run.threads is None:
            self._run_queued()
            pending: list[Handle] = []
        else:
            running = {h._future for h in handles if not h._future.done()}  # step threads' Futures
            if running and not (any_one and len(running) < len(handles)):
                _, running = wait(running, return_when=FIRST_COMPLETED if any_one else ALL_COMPLETED)
            pending = [h for h in handles if h._future in running]
        for handle in handles:
            future = handle._future
            if future.done() and not future.cancelled():
                exc = future.exception()
                if exc is not None and not isinstance(exc, StepError):
                    raise exc
        return pending

    def _run_queued(self) -> None:
        """One worker: run every begun call now, in the order begun; their settles share a sync."""
        run = self._run
        queued, run.queued = run.queued, []
        run.grouping = True
        try:
            for handle, call, entry, promise in queued:
                try:
                    handle._future.set_result(self._finish(call, entry, promise))
                except StepError as exc:
                    handle._future.set_exception(exc)
                except BaseException as exc:
                    handle._future.set_exception(exc)
                    run.queued = [q for q in queued if not q[0].done()] + run.queued
                    raise
        finally:
            run.grouping = False
            self._sync_owed()

    def _abandon(self, handles: list[Handle]) -> None:
        """Leaving a workflow: calls begun but not started are dropped (they are pending; the
        next run starts them), and those in flight end first (a step thread never outlives it)."""
        run = self._run
        if run.threads is None:
            mine = {id(h) for h in handles}
            run.queued = [q for q in run.queued if id(q[0]) not in mine]
            for handle in handles:
                handle._future.cancel()  # never run: a wait for it ends (none can be made)
            return
        for handle in handles:
            handle._future.cancel()  # only one not started yet
        wait([h._future for h in handles])

    def _check_ended_cleanly(self, call: Call, entry: Registered, ctx: Context) -> None:
        """A workflow that ends must have yielded every call it made, and made every call its
        history records: ending before a recorded call means the code changed (Temporal's
        replayer refuses this too)."""
        ctx.check_all_yielded()
        unmatched = child_id(call.promise_id, ctx.calls_made)
        recorded = self.store.get(unmatched)
        if recorded is not None:
            raise NonDeterminismError(
                unmatched,
                f"{recorded.param.get('fn')} v{recorded.param.get('v')}",
                f"no call there (workflow {entry.name} ended after {ctx.calls_made} call(s))",
            )

    def _patched(self, ctx: Context, patch: Patch) -> bool | None:
        """Which branch of a patch this run takes here (see patches.py); None when deprecated."""
        here = ctx.calls_made
        marker = self.store.get(patch_marker_id(ctx.promise_id, patch.name))
        if marker is not None:
            new_code = here >= marker.param["at"]
        else:
            new_code = self.store.get(child_id(ctx.promise_id, here)) is None  # at the end of history
            if new_code and not patch.deprecated:
                self._record_patch(ctx.promise_id, patch.name, here)
        if not patch.deprecated:
            return new_code
        if not new_code:
            raise NonDeterminismError(
                child_id(ctx.promise_id, here), f"the code before patch {patch.name!r}",
                f"deprecate_patch({patch.name!r})",
                f"A run recorded before the patch is still in flight: restore "
                f"`if (yield ctx.patched({patch.name!r})):` and its old branch until it is done",
            )
        return None

    def _record_patch(self, workflow_id: str, name: str, at: int) -> None:
        promise_id = patch_marker_id(workflow_id, name)
        self.store.create(promise_id, {"patch": name, "at": at})
        self.store.resolve(promise_id, True)

    # -- steps -----------------------------------------------------------------------------

    def _execute_step(self, call: Call, entry: Registered, promise: Promise) -> Any:
        policy = call.retry or self.policy
        pool = self._runs.state.pool
        if pool is not None and pool.settles:  # a fleet runs it, settles it, and tells of it
            settled = pool.settle_remotely(call.promise_id, policy)
            if settled.state is State.RESOLVED:
                return _own(settled.value)
            raise StepError(call.promise_id, entry.name, settled.error)
        found = self._recover(call, entry, promise.attempts)
        if found is not None:  # the dead attempt's effect is durable: no attempt is spent
            return self._resolve(call, entry, found)
        done = promise.attempts_since_reopen
        if done >= policy.max_attempts:
            self._fail(call, entry, AttemptsExhaustedError(
                f"all {done} attempts were used; the last one was cut short (its process died)"
            ))
        try:
            value = self._attempt(call, entry, policy)
        except Exception as exc:
            value = self._retry_after(exc, call, entry, policy, done + 1)
        return self._resolve(call, entry, value)

    def _attempt(self, call: Call, entry: Registered, policy: RetryPolicy) -> Any:
        """One attempt: recorded durably before the function runs, so crashes count too."""
        attempt = self.store.start_attempt(call.promise_id)
        self._emit("started", call, entry, attempt=attempt)
        if failpoints.armed:  # a supervisor's "kill at step N" waits here to be killed
            failpoints.hit(failpoints.STEP_STARTED, failpoints.step_started_key(call.promise_id))
        return self._as_step(call, entry, attempt, call.fn, policy.timeout)

    def _recover(self, call: Call, entry: Registered, last_attempt: int) -> Any:
        """What the step's last, unsettled attempt made durable, if the step has a recover
        function and an attempt was made; else None."""
        if entry.recover is None or not last_attempt:
            return None
        for _ in range(_RECOVER_TRIES):  # a look that died with its step process looks again
            try:
                found = self._as_step(call, entry, last_attempt, entry.recover)
                break
            except StepProcessLost as lost:
                log.warning("the recover function of %s was cut short (%s); looking again",
                            call.promise_id, lost)
        else:
            found = None  # found out by the attempt itself: a step that can recover is idempotent
        if found is not None:
            self._emit("recovered", call, entry, attempt=last_attempt)
        return found

    def _as_step(
        self, call: Call, entry: Registered, attempt: int, fn: Callable[..., Any],
        timeout: float | None = None,
    ) -> Any:
        """Call `fn` with the call's arguments, `current_step()` describing the call meanwhile:
        in a step process when the run has a pool (for a `ctx.run` step too: every step sees
        the dependencies of a step process), else here."""
        run = self._runs.state
        info = StepInfo(call.promise_id, attempt, entry.name, run.dependencies, entry.version)
        if run.pool is None:
            return call_as_step(info, fn, call.args, call.kwargs, timeout)
        return run.pool.run(info, fn, call.args, call.kwargs, timeout)

    def _retry_after(
        self, exc: Exception, call: Call, entry: Registered, policy: RetryPolicy, done: int
    ) -> Any:
        """After a failed attempt, retry with tenacity while the policy allows; else reject."""
        if policy.retryable(exc) and done < policy.max_attempts:
            failures = [exc]

            def attempt() -> Any:
                # Tenacity's first attempt re-raises the failure that brought us here, so the
                # happy path never pays for tenacity and its backoff starts from that failure.
                if failures:
                    raise failures.pop()
                found = self._recovered(call, entry)
                return found if found is not None else self._attempt(call, entry, policy)

            retrying = policy.retrying(
                attempts_done=done,
                on_retry=lambda n, err, delay: self._log_retry(call, entry, n, err, delay),
                sleep=self._sleep_unless_stopped,
            )
            try:
                return retrying(attempt)
            except Exception as last:
                exc = last
        if isinstance(exc, EngineError | StoreError):
            raise exc
        found = self._recovered(call, entry)
        if found is not None:
            return found
        self._fail(call, entry, exc)

    def _recovered(self, call: Call, entry: Registered) -> Any:
        """After a failed attempt: what it made durable before it failed (a timeout can land
        after a commit), if the step has a recover function that finds it; else None."""
        return self._recover(call, entry, self.store.get(call.promise_id).attempts)

    def _log_retry(
        self, call: Call, entry: Registered, attempt: int, exc: BaseException, delay: float
    ) -> None:
        log.warning(
            "step '%s' (%s) failed with '%s: %s' (attempt %d; retrying in %g s)",
            entry.name, call.promise_id, type(exc).__name__, exc, attempt, delay,
        )
        self._emit("retrying", call, entry, attempt=attempt, error=str(exc), delay=delay)

    # -- settling --------------------------------------------------------------------------

    def _resolve(self, call: Call, entry: Registered, value: Any) -> Any:
        defer = self._defer(entry.recover is not None)
        hold = not defer and self._may_hold(call.promise_id)
        try:
            promise = self.store.resolve(call.promise_id, value, defer_sync=defer, hold=hold)
        except TypeError as exc:  # the result cannot be stored: a bug in the step, not retried
            self._fail(call, entry, exc)
        self._emit("resolved", call, entry)
        return _own(promise.value)

    def _fail(self, call: Call, entry: Registered, exc: BaseException) -> NoReturn:
        """Reject the call's promise with `exc` and raise the StepError every replay will raise."""
        current = self.store.get(call.promise_id)
        error = failure_record(exc, 0 if current is None else current.attempts)
        self.store.reject(call.promise_id, error, defer_sync=self._defer(False))
        self._emit("rejected", call, entry, error=f"{error['type']}: {error['message']}")
        raise StepError(call.promise_id, entry.name, error) from exc

    def _defer(self, recoverable: bool) -> bool:
        """Whether a settle may wait for a later sync: a step whose recover function finds its
        effect again needs none of its own; in a group of begun calls, one sync ends the group."""
        if recoverable:
            return True
        run = self._runs.state
        # A group run by a wait without a pool, or a step thread of a pool: the driver syncs
        # before the workflow goes on (the flag is only ever set in the driving thread).
        if run.grouping or (run.threads is not None and getattr(self._runs, "in_step_thread", False)):
            run.owed = True
            return True
        return False

    def _may_hold(self, promise_id: str) -> bool:
        """Whether a settle may wait a moment for the store's next write (the contract's `hold`):
        the driving thread's, whose next step's creation most often comes at once; never the
        root's, which the run returns."""
        return (self.store.holds_settles and not is_root(promise_id)
                and not getattr(self._runs, "in_step_thread", False))

    def _sync_owed(self) -> None:
        """Sync the settles deferred by a group or by step threads, before the workflow sees
        their values: the ones that ended together share this one sync (group commit)."""
        run = self._run
        if run.owed:
            run.owed = False  # before the sync: a settle deferred after it sets it again
            self.store.sync()

    def _emit(self, kind: str, call: Call, entry: Registered, **detail: Any) -> None:
        if self._on_event is not None:
            try:
                self._on_event(StepEvent(kind, call.promise_id, entry.name, **detail))
            except Exception as exc:  # the observer's fault, never the step's: settle nothing
                raise ObserverError(f"the on_event observer failed at {call.promise_id}: {exc!r}") from exc

    def _sleep_unless_stopped(self, seconds: float) -> None:
        """The backoff between attempts; a stop request (or a cancel) ends it, and the run."""
        self._raise_if_stopping()
        if self._should_stop is None:
            self._sleep(seconds)
            return
        left = seconds
        while left > 0:
            self._raise_if_stopping()
            self._sleep(min(left, _STOP_POLL_S))
            left -= _STOP_POLL_S


class _ThrownIn(Exception):
    """Carries an exception to throw into the workflow at its yield (ctx.map's iterable's)."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


class _Outcome:
    """The outcome of a call run in the driver (or replayed), for its Handle: a Future's reading
    side without the lock a Future pays for on every call, since no other thread touches it."""

    __slots__ = ("_cancelled", "_done", "_exc", "_value")

    def __init__(self) -> None:
        self._done = self._cancelled = False
        self._value: Any = None
        self._exc: BaseException | None = None

    def set_result(self, value: Any) -> None:
        self._value, self._done = value, True

    def set_exception(self, exc: BaseException) -> None:
        self._exc, self._done = exc, True

    def cancel(self) -> bool:
        if not self._done:
            self._cancelled = self._done = True
        return self._cancelled

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._done

    def exception(self) -> BaseException | None:
        return self._exc

    def result(self) -> Any:
        if self._exc is not None:
            raise self._exc
        return self._value


class _CancelWatch:
    """Whether the run's workflow was cancelled, asked of the store at most every
    _CANCEL_POLL_S (a file's presence, or a row): a step boundary costs no store round trip."""

    def __init__(self, store: PromiseStore, root_id: str) -> None:
        self.root_id = root_id
        self._store = store
        self._seen = False
        self._next_look = 0.0

    def requested(self, *, now: bool = False) -> bool:
        """Whether a cancel is requested; `now`: asked of the store even if it was a moment ago."""
        if not self._seen and (now or time.monotonic() >= self._next_look):
            self._next_look = time.monotonic() + _CANCEL_POLL_S
            self._seen = self._store.cancel_requested(self.root_id)
        return self._seen


class _RunState:
    """What one run of a Runner holds: its steps' dependencies, its cancel watch, its pool and
    step threads, and (without a pool) the calls begun but not run yet and the group being
    settled."""

    def __init__(self, dependencies: Mapping[str, Any], cancel: _CancelWatch | None = None) -> None:
        self.dependencies = dependencies
        self.cancel = cancel
        self.pool: StepExecutor | None = None
        self.threads: ThreadPoolExecutor | None = None
        self.queued: list[tuple[Handle, Call, Registered, Promise]] = []
        self.grouping = False  # the driver runs a group of begun calls (no pool)
        self.owed = False  # a settle was deferred that the driver has not synced yet




_SHARED_SAFELY = (str, int, float, bool, type(None))


def _own(value: Any) -> Any:
    """A stored value as the workflow's own: a list or dict is copied, so code that changes the
    result it got cannot change what the store holds (and replays later in this process)."""
    return value if type(value) in _SHARED_SAFELY else normalize(value)


def run(
    store: PromiseStore, root_id: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """Run or resume the workflow `root_id` with default settings (see Runner for options)."""
    return Runner(store).run(root_id, fn, *args, **kwargs)
