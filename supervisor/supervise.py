"""The supervision loop: spawn the worker, watch it, kill it when asked, restart it, report.

Generic over workflows: the worker is `python -m workflow run MODULE:FUNCTION ...`, and all the
supervisor learns comes from its progress pipe, its exit status (workflow/exitcodes.py) and the
store, read through the store API and workflow/ids.py; it imports no application module.

Restarts: after a kill of ours, at once; after an unplanned death (a crash or a signal from
elsewhere), with exponential backoff, and at most `max_restarts` times in a row. A worker whose
progress pipe stays silent for `stall_timeout` seconds (it heartbeats every second or so) is
hung, stopped or stuck in C code holding the GIL: it is SIGKILLed and restarted like an
unplanned death. A worker that ends with a status no restart can change (bad input, a failed
step, a conflicting id) ends the run. The result is read from the store, never taken from the
worker's word.

A worker with a pool (`--workers` above 1) runs several steps at once, each in a process it
forked, in the worker's process group: a kill of the worker is a SIGKILL to that group, which
reaches the whole pool and costs an attempt of every step in flight, so no such kill lands
while any of them runs its last attempt. A pool kill SIGKILLs one of those processes alone.
"""

from __future__ import annotations

import logging
import os
import selectors
import shlex
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from store import Promise, State, failpoints
from store.locking import LockHeldError, OwnedLock
from store.owners import DEFAULT_LEASE_S
from workflow import exitcodes, progress
from workflow.child import LOCK_TIMEOUT_S, STEP_TIMEOUT_S
from workflow.history import History, read_history, state_of
from workflow.ids import child_id

from .child import Child, ChildEnd
from .events import EventLog
from .faults import (
    Point,
    RandomKill,
    at_step_start,
    attempts_before_kill,
    in_store_write,
    kill_would_fail,
    latest_kill_unit,
    paused_at,
    pool_victim,
    steps_in_reach,
    store_write_step,
)
from .live import Display
from .location import StoreLocation
from .report import ChildReport, KillReport, RunReport, StallReport, Terms
from .watch import Watch

log = logging.getLogger("supervisor")
MAX_BACKOFF_S = 30.0
STARTUP_GUESS_S = 0.15
STARTUP_SHARE = 0.2  # the share of timed kills that land in start-up or replay
STEP_GUESS_S = 0.005
HEARTBEAT_S = 1.0  # how often a worker heartbeats: at most a quarter of the stall timeout


class StateDirBusyError(Exception):
    """Another supervisor runs on this state dir."""


@dataclass
class Settings:
    """One supervised workflow: what the worker runs, where its store is, which kills to make."""

    root_id: str
    target: str | None  # MODULE:FUNCTION, imported only by the worker (None: `join` it as recorded)
    location: StoreLocation
    args: list[str] = field(default_factory=list)  # the workflow's arguments, as JSON texts
    setup: str | None = None  # MODULE:FUNCTION of the worker's setup hook
    step_count: int | None = None  # the workflow's units in all, when known up front
    unit_records: int | None = None  # records per unit (an import's batch size): a rate in records/s
    kill_at_steps: set[int] = field(default_factory=set)  # unit numbers
    kill_point: Callable[[str, int], Point] = at_step_start  # where a kill-at-step waits
    random_kills: list[RandomKill] = field(default_factory=list)
    planned_failure: int | None = None  # a unit whose first attempt is made to fail (see faults)
    extra_failpoints: list[dict[str, str]] = field(default_factory=list)  # armed in every worker
    max_restarts: int = 10
    restart_backoff: float = 0.5
    max_attempts: int = 10
    retry_initial: float = 1.0
    grace: float = 10.0
    stall_timeout: float = 180.0
    step_timeout: float = STEP_TIMEOUT_S
    lock_timeout: float = LOCK_TIMEOUT_S
    durability: str = "full"
    workers: int = 1  # steps run at once, in a pool of processes under the worker
    lease: float = DEFAULT_LEASE_S  # on PostgreSQL: the driver's lease and the executors' claims
    terms: Terms = field(default_factory=Terms)


def worker_args(s: Settings) -> list[str]:
    """The worker's command line after `python -m workflow` (Child.spawn adds the progress fd):
    `run` the target, or (without one) `join` the workflow as the database recorded it."""
    if s.target is None:
        args = ["join", "--id", s.root_id, *s.location.child_flags()]
    else:
        args = ["run", s.target, "--id", s.root_id]
        for arg in s.args:
            args += ["--arg", arg]
        if s.setup is not None:
            args += ["--setup", s.setup]
        args += [*s.location.child_flags(), "--lock-timeout", str(s.lock_timeout)]
    return [
        *args,
        "--max-attempts", str(s.max_attempts),
        "--retry-initial", str(s.retry_initial),
        "--step-timeout", str(s.step_timeout),
        "--durability", s.durability,
        "--workers", str(s.workers),
        "--lease", str(s.lease),
        "--heartbeat", str(min(HEARTBEAT_S, s.stall_timeout / 4)),
        "--quiet",
    ]


class Supervisor:
    """Runs one workflow to its end through as many workers as it takes; `run()` reports it."""

    def __init__(self, settings: Settings, display: Display) -> None:
        self.s = settings
        self.report = RunReport(settings.root_id, settings.location.report_entry(), settings.terms)
        self.stop_signal: signal.Signals | None = None
        self._display = display
        self._events = EventLog(settings.location.state_dir, settings.root_id)
        self._pending_pauses = set(settings.kill_at_steps)
        self._late_kills: dict[int, int] = {}  # unit -> late random kills delivered there
        self._random = list(settings.random_kills)
        self._step_count = settings.step_count
        self._step_seconds = STEP_GUESS_S
        self._startup_seconds = STARTUP_GUESS_S
        self._wakeup_r = -1

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> RunReport:
        started = time.monotonic()
        lock = self._lock()
        self._events.add("supervisor", pid=os.getpid())
        try:
            self.s.location.create_if_missing(self.s.lock_timeout)
            with self._signals_forwarded():
                self._loop()
        finally:
            if lock is not None:
                lock.release()
            self.report.elapsed_s = time.monotonic() - started
        return self.report

    def _lock(self) -> OwnedLock | None:
        """One supervisor per state dir (a store given by URL has its workflow lock only)."""
        path = self.s.location.lock_path
        if path is None:
            return None
        lock = OwnedLock(path)
        try:
            lock.acquire(0, record_owner=True)
        except LockHeldError as exc:
            raise StateDirBusyError(
                f"{self.s.location.state_dir}: another supervisor is running here ({exc.owner})"
            ) from None
        return lock

    def _loop(self) -> None:
        unplanned = 0  # unplanned deaths in a row, with no step done in between
        while True:
            history = self._read_history()
            calls, steps = ([], {}) if history is None else (history.calls, history.steps)
            units_at = {} if history is None else self.s.terms.units_of(history).steps
            units = list(units_at.values())
            if history is not None and self._step_count is None:
                self._step_count = self.s.terms.step_count(history)
            first = _first_unfinished(steps)
            self._drop_pauses_that_would_fail(units)
            kill = self._next_kill(first, steps, units)
            store_write = store_write_step(kill, first)
            pauses = {self.s.kill_point(self.s.root_id, n): n for n in sorted(self._pending_pauses)}
            if kill is not None and kill.unit is not None:
                pauses.setdefault(self.s.kill_point(self.s.root_id, kill.unit), kill.unit)
            child = self._spawn(list(pauses), store_write)
            self._events.add("spawn", pid=child.pid)
            watch = Watch(ChildReport(child.pid, exit="running"), steps_done_before=_done(units),
                          unit_of={p.id: n for n, p in enumerate(units)},
                          other_steps=sorted(set(steps) - set(units_at)),
                          pauses=pauses, store_write=store_write,
                          last_attempts={p.id: p.attempts_at_reopen + self.s.max_attempts
                                         for p in calls})
            if kill is not None:
                self._arm(watch, kill)
            self._watch(child, watch)
            end = child.reap()
            watch.report.exit = end.describe()
            self.report.children.append(watch.report)
            # A kill counts only if it is what ended the child (it may have exited just before).
            ours = watch.kill if end.signal is signal.SIGKILL else None
            self._log_end(end, watch, ours)
            self._record_end(end, watch, ours)
            if ours is not None:
                self.report.kills.append(ours)
            if watch.stall is not None and end.signal is signal.SIGKILL:
                self.report.stalls.append(watch.stall)
            left = watch.random_kill
            if left is not None and (ours is None or ours.kind != left.kind):
                # not delivered to this child: keep it for the next
                self._random.insert(0, replace(left, unit=None))
            if end.returncode == exitcodes.OK:
                self._finish(end)
                return
            if end.returncode == exitcodes.CANCELLED:
                self._cancelled(end)
                return
            if self.stop_signal is not None:
                self._interrupted(
                    f"worker {end.pid} {end.describe()}; {self._steps_done()} done; "
                    "run the same command again to resume"
                )
                return
            if ours is not None:
                self.report.restarts += 1
                self._events.add("restart", after=end.pid)
                self._show_progress(watch)
                continue
            if end.returncode > 0 and end.returncode not in exitcodes.RESTARTABLE:
                self._failed(end, child, watch)
                return
            unplanned = 1 if watch.report.executed else unplanned + 1
            if unplanned > self.s.max_restarts:
                self.report.error = (
                    f"gave up after {self.s.max_restarts} restarts in a row: worker {end.pid} "
                    f"{end.describe()}; last error: {watch.report.error or child.last_error() or 'none'}"
                )
                return
            delay = min(MAX_BACKOFF_S, self.s.restart_backoff * 2 ** (unplanned - 1))
            log.warning("restarting the worker in %g s (restart %d in a row, at most %d)",
                        delay, unplanned, self.s.max_restarts)
            if self._sleep_unless_signalled(delay):
                self._interrupted("while waiting to restart the worker")
                return
            self.report.restarts += 1
            self._events.add("restart", after=end.pid)
            self._show_progress(watch)

    def _interrupted(self, detail: str) -> None:
        self.report.interrupted_by = self.stop_signal.name
        self.report.error = f"interrupted by {self.stop_signal.name}: {detail}"

    def _failed(self, end: ChildEnd, child: Child, watch: Watch) -> None:
        """The worker ended with a status no restart can change."""
        self.report.error = watch.report.error or child.last_error() or end.describe()
        self.report.busy = end.returncode == exitcodes.BUSY
        if end.returncode == exitcodes.FAILED:
            self.report.error = self.s.terms.failure_text(
                self.report.error,
                f"python -m supervisor retry --id {self.s.root_id}{self.s.location.cli_flags()}")

    def _cancelled(self, end: ChildEnd) -> None:
        """The worker ended the workflow as cancelled (or found it so): checked in the store."""
        history = self._read_history()
        if history is None or state_of(history.root) != "cancelled":
            noun = self.s.terms.noun
            self.report.error = f"worker {end.pid} said the {noun} is cancelled, but its store does not"
            return
        self.report.cancelled = True
        self.report.resume = (f"python -m supervisor retry --id {shlex.quote(self.s.root_id)}"
                              f"{self.s.location.cli_flags()}")

    def _finish(self, end: ChildEnd) -> None:
        t = self.s.terms
        history = self._read_history()
        if history is None or history.root.state is not State.RESOLVED:
            self.report.error = f"worker {end.pid} exited 0 but the {t.noun}'s result is not stored"
            return
        self.report.ok, self.report.result = True, history.root.value
        units = self._units(history)
        for n in sorted(self._pending_pauses):
            step = units[n] if n < len(units) else None
            if step is None:
                why = f"the {t.noun} has no {t.unit} {n}"
            elif step.attempts == 0:  # a sub-workflow: its own calls have the attempts
                why = f"{t.unit} {n} is a sub-workflow, which has no attempt to be killed in"
            else:
                why = f"the {t.unit} was already done"
            self.report.undelivered_kills.append(f"kill at {t.unit} {n}: {why}")
        self.report.undelivered_kills.extend(
            f"random {k.kind} kill: the {t.noun} finished first, or every chance to land it "
            f"would have spent a {t.unit}'s last attempt{_NO_POOL if k.kind == 'pool' else ''}"
            for k in self._random
        )

    # -- one child -----------------------------------------------------------------------

    def _spawn(self, pauses: list[Point], store_write: int | None) -> Child:
        if store_write is not None:
            pauses = [*pauses, in_store_write(self.s.root_id, store_write)]
        points = paused_at(pauses) + self.s.extra_failpoints
        child = Child.spawn(worker_args(self.s), failpoints.environment(points))
        log.debug("spawned worker %d with failpoints %s", child.pid, points)
        return child

    def _next_kill(
        self, first: int, steps: dict[int, Promise], units: list[Promise]
    ) -> RandomKill | None:
        """The next random kill, unless it could use up a step's last attempt: a kill of ours
        must never fail a step. (A timed or pool kill is checked again when it is due; a
        store-write kill cannot be, as the worker waits for it inside the store, so every step
        it may catch in flight is checked now.) A pool kill also waits until no kill-at-step is
        left to land: it could spend the attempt before the last of the step that kill aims at."""
        if not self._random:
            return None
        kill = self._random[0]
        if kill.kind != "pool":  # a pool kill leaves the worker running: it cannot wait at a unit too
            kill = replace(kill, unit=self._latest_kill_unit(units))
        if kill.kind == "pool" and self._live_pauses(units):
            return None
        target = first + (kill.batch_offset if kill.kind == "store-write" else 0)
        reach = {target}
        if kill.kind == "store-write":
            begun = [n for n, p in steps.items() if p.state is State.PENDING]
            reach = steps_in_reach(target, begun, self.s.workers)
        for n in sorted(reach):
            step = steps.get(n)
            spent = attempts_before_kill(step, self._may_be_planned_failure(step, units))
            if kill_would_fail(spent, self.s.max_attempts):
                return None
        self._random.pop(0)
        return kill

    def _latest_kill_unit(self, units: list[Promise]) -> int | None:
        """The unit by which the next random kill lands at the latest (faults.latest_kill_unit)."""
        first = _first_unfinished(dict(enumerate(units)))

        def would_fail(n: int) -> bool:
            step = units[n] if n < len(units) else None
            if step is not None and step.state is State.RESOLVED:  # done (with a pool): no kill there
                return True
            spent = attempts_before_kill(step, n == self.s.planned_failure)
            return kill_would_fail(spent, self.s.max_attempts)

        return latest_kill_unit(len(self._random), self._step_count, first, self._late_kills, would_fail)

    def _may_be_planned_failure(self, step: Promise | None, units: list[Promise]) -> bool:
        """Whether `step` (None: a step not created yet) is, or may be, the unit whose first
        attempt is made to fail."""
        planned = self.s.planned_failure
        if planned is None:
            return False
        if planned >= len(units):  # that unit is still to come: any new step may be it
            return step is None
        return step is not None and step.id == units[planned].id

    def _live_pauses(self, units: list[Promise]) -> list[int]:
        """The kill-at-step pauses still to land: on units not yet resolved."""
        return [n for n in self._pending_pauses
                if n >= len(units) or units[n].state is not State.RESOLVED]

    def _drop_pauses_that_would_fail(self, units: list[Promise]) -> None:
        """Disarm a kill-at-step whose unit (of a resumed run) is down to its last attempt: the
        kill is reported undelivered, and the unit is not failed by it."""
        unit = self.s.terms.unit
        for n in sorted(self._pending_pauses):
            promise = units[n] if n < len(units) else None
            if promise is not None and promise.state is State.RESOLVED:
                continue  # reported at the end as already done
            spent = attempts_before_kill(promise, n == self.s.planned_failure)
            if kill_would_fail(spent, self.s.max_attempts):
                self._pending_pauses.discard(n)
                self.report.undelivered_kills.append(
                    f"kill at {unit} {n}: it has {max(0, self.s.max_attempts - spent)} of its "
                    f"{self.s.max_attempts} attempts left, and a kill of ours must not spend the last"
                )

    def _arm(self, watch: Watch, kill: RandomKill) -> None:
        """Arm a random kill on this worker. A store-write kill waits in the store (armed at the
        spawn). A timed kill lands in start-up and replay (a few of them), or, like a pool kill,
        a drawn number of new units into the run plus a fraction of a step: timed by the
        worker's own pace."""
        watch.random_kill = kill
        if kill.kind == "store-write":
            return
        watch.timed_kill_delay = kill.delay
        now = time.monotonic()
        if kill.kind == "timed" and kill.share < STARTUP_SHARE and watch.first_step_at is None:
            watch.kill_deadline = now + kill.delay * self._startup_seconds
            return
        done = watch.steps_done_before + len(watch.report.executed)
        remaining = None if self._step_count is None else max(0, self._step_count - done)
        after = kill.steps_before(remaining, len(self._random) + 1)
        if watch.first_step_at is not None:  # armed after a pool kill: one more unit done first
            after = max(after, 1)
        watch.timed_kill_after = len(watch.report.executed) + after

    def _arm_next(self, watch: Watch) -> None:
        """After a pool kill, the worker runs on: arm on it the next random kill that a running
        worker can take (a store-write kill is armed when a worker is spawned: it stays first
        in line for the next one)."""
        for i, kill in enumerate(self._random):
            if kill.kind != "store-write":
                self._arm(watch, self._random.pop(i))
                return

    def _watch(self, child: Child, watch: Watch) -> None:
        """Follow the child until its pipes close, delivering kills and forwarded signals."""
        selector = selectors.DefaultSelector()
        child.register(selector)
        selector.register(self._wakeup_r, selectors.EVENT_READ, "signal")
        open_pipes = 2
        try:
            while open_pipes:
                if self.stop_signal is not None and not watch.stop_forwarded:
                    self._forward_stop(child, watch)
                ready = selector.select(self._time_to_next_deadline(watch))
                for key, _ in ready:  # what the worker said first: a kill decides on it
                    if key.data == "signal":
                        os.read(self._wakeup_r, 512)
                    elif self._read_pipe(key.fd, key.data, child, watch):
                        selector.unregister(key.fd)
                        open_pipes -= 1
                self._act_on_deadlines(child, watch)
                stall_deadline = watch.stall_deadline(self.s.stall_timeout)
                if open_pipes and stall_deadline is not None and time.monotonic() >= stall_deadline:
                    self._kill_stalled(child, watch)
        finally:
            selector.close()

    def _forward_stop(self, child: Child, watch: Watch) -> None:
        log.warning("%s: stopping worker %d after its %s in flight", self.stop_signal.name, child.pid,
                    self.s.terms.unit)
        child.signal_group(signal.SIGTERM)
        watch.stop_forwarded = True
        watch.grace_deadline = time.monotonic() + self.s.grace
        watch.kill_deadline = None

    def _time_to_next_deadline(self, watch: Watch) -> float | None:
        deadlines = [watch.kill_deadline, watch.grace_deadline, watch.stall_deadline(self.s.stall_timeout)]
        deadline = min(filter(None, deadlines), default=None)
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _act_on_deadlines(self, child: Child, watch: Watch) -> None:
        """A timed or pool kill that is due, and the SIGKILL of a worker that did not stop
        within its grace after a forwarded signal: neither when it would spend a step's last
        attempt. A kill that cannot land now tries again once the next step is done."""
        now = time.monotonic()
        if watch.kill_deadline is not None and now >= watch.kill_deadline:
            watch.kill_deadline = None
            if watch.kill is None and watch.random_kill is not None:
                self._deliver_timed(child, watch, watch.random_kill)
        if watch.grace_deadline is not None and now >= watch.grace_deadline:
            watch.grace_deadline = None
            if self._last_attempt_in_flight(watch):
                log.warning("worker %d did not stop within %g s, but a kill would spend the last "
                            "attempt of %s: waiting for it to end (--step-timeout bounds it)",
                            child.pid, self.s.grace, ", ".join(watch.flights) or "a step")
                return
            log.warning("worker %d did not stop within %g s; SIGKILL", child.pid, self.s.grace)
            child.signal_group(signal.SIGKILL)

    def _deliver_timed(self, child: Child, watch: Watch, kill: RandomKill) -> None:
        """SIGKILL the worker (a timed kill) or one process of its pool (a pool kill: it costs
        the attempt of the step that process runs, if any; killed idle, it may still cost the
        attempt of the next step sent to it, as the pool may not see at once that it died, so
        a pool kill also waits while a step waiting to be retried is down to its last attempt)."""
        ahead = 1 if kill.kind == "pool" else 0
        if self.stop_signal is None and not self._last_attempt_in_flight(watch, ahead=ahead):
            if kill.kind == "timed":
                self._kill(child, watch, "timed", watch.step_in_flight())
                return
            victim = pool_victim(kill, child.pool())
            if victim is not None and child.kill_one(victim):
                self._pool_killed(child, watch, victim)
                return
        watch.timed_kill_after = len(watch.report.executed) + 1

    def _pool_killed(self, child: Child, watch: Watch, victim: int) -> None:
        """A pool process is killed: the worker runs on and retries its step (the first retry
        that follows names it, see _on_step). The next random kill is armed on the same worker."""
        kill = KillReport(victim, "pool", None, worker=child.pid)
        log.info("SIGKILL to process %d of worker %d's pool", victim, child.pid)
        self._events.add("kill", pid=victim, kind="pool", unit=None, worker=child.pid)
        self.report.kills.append(kill)
        watch.unplaced_pool_kills.append(kill)
        watch.random_kill = None
        self._arm_next(watch)

    def _last_attempt_in_flight(self, watch: Watch, besides: str | None = None, ahead: int = 0) -> bool:
        """Whether a step's last allowed attempt may be running (besides that of step `besides`),
        by what the worker said and by the store (which the worker writes before it says so):
        then a kill would fail the step. With `ahead` 1, also whether the next attempt of a
        step not running (waiting to be retried) is its last."""
        if watch.on_last_attempt(self.s.max_attempts, besides):
            return True
        history = self._read_history()
        return history is not None and any(
            p.state is State.PENDING and p.id != besides
            and p.attempts + (0 if watch.running(p.id) else ahead)
            >= watch.last_attempts.get(p.id, self.s.max_attempts)
            for p in history.calls
        )

    def _read_pipe(self, fd: int, pipe: str, child: Child, watch: Watch) -> bool:
        """Relay stderr or act on progress events (any line is a sign of life); True at EOF."""
        lines, eof = child.read(fd)
        if pipe == "stderr":
            for text in child.output(lines):
                self._display.message(text)
        elif lines:
            watch.last_heard = time.monotonic()
            for event in child.events(lines):
                self._on_event(event, child, watch)
        return eof

    def _on_event(self, event: dict[str, Any], child: Child, watch: Watch) -> None:
        """Act on a progress line. A failpoint's announcement may come from the worker or from a
        process of its pool (the one running the step): either way the worker's whole process
        group is killed."""
        kind = event.get("event")
        if kind == progress.STEP:
            self._on_step(event, watch)
            if watch.paused is not None and watch.kill is None:
                self._kill_paused(child, watch)
        elif kind == failpoints.ANNOUNCED and watch.kill is None:
            point = (event.get("name"), event.get("key"))
            paused = watch.pauses.get(point)
            late = watch.random_kill is not None and watch.random_kill.unit == paused
            if paused is not None and (paused in self._pending_pauses or late):
                watch.paused = paused
                if not self._kill_paused(child, watch):
                    log.info("%s %d waits to be killed until no other %s in flight runs its last "
                             "attempt", self.s.terms.unit, paused, self.s.terms.unit)
            elif watch.store_write is not None and point == in_store_write(self.s.root_id, watch.store_write):
                torn = child_id(self.s.root_id, watch.store_write)
                self._kill(child, watch, "store-write", watch.unit_of.get(torn))
        elif kind == progress.ENDED:
            watch.report.error = event.get("error")

    def _kill_paused(self, child: Child, watch: Watch) -> bool:
        """Kill the worker whose step waits at its kill-at-step failpoint (or a late random
        kill's), unless another step
        in flight (with a pool) runs its last attempt: the kill would spend it too. The paused
        step waits meanwhile, and this is tried again as the others settle. True if killed."""
        step = watch.paused
        if self._last_attempt_in_flight(watch, besides=watch.id_of(step)):
            return False
        watch.paused = None
        if step in self._pending_pauses:
            self._pending_pauses.discard(step)
            self._kill(child, watch, f"kill-at-{self.s.terms.unit}", step)
        else:  # a random kill whose drawn moment had not come by this unit
            self._late_kills[step] = self._late_kills.get(step, 0) + 1
            watch.random_kill = replace(watch.random_kill, kind=f"mid-{self.s.terms.unit}")
            watch.kill_deadline = None
            self._kill(child, watch, watch.random_kill.kind, step)
        return True

    def _on_step(self, event: dict[str, Any], watch: Watch) -> None:
        """Follow the steps: the attempts in flight (at any depth), the units done."""
        kind, promise_id = event.get("kind"), event.get("id")
        step = self._unit_of(event, watch)
        now = time.monotonic()
        if kind == progress.KIND_STARTED:
            if watch.first_step_at is None:  # the first step this worker starts: start-up is over
                self._startup_seconds = 0.8 * self._startup_seconds + 0.2 * (now - watch.spawned_at)
                if watch.timed_kill_after == 0:
                    watch.kill_deadline = now + watch.timed_kill_delay * self._step_seconds
            watch.started(promise_id, step, event.get("attempt") or 0, now)
        elif kind == progress.KIND_RETRYING:  # the attempt ended; the next waits its backoff
            watch.retrying(promise_id)
            self._events.add("retry", unit=step, attempt=event.get("attempt"), error=event.get("error"))
            if watch.unplaced_pool_kills:  # the step whose pool process we killed, most likely
                watch.unplaced_pool_kills.pop(0).step = step
        elif kind == progress.KIND_RESOLVED:
            flight = watch.settled(promise_id)
            if flight is not None:
                self._step_seconds = 0.8 * self._step_seconds + 0.2 * (now - flight.started_at)
            if step is not None:
                self._step_done(step, watch, now)
        elif kind == progress.KIND_REJECTED:
            watch.settled(promise_id)
        elif kind == progress.KIND_REPLAYED and step is not None:
            watch.report.replayed += 1
        elif kind == progress.KIND_REPLAYED and promise_id == self.s.root_id:
            watch.report.replayed = watch.steps_done_before  # it was done: all steps found done

    def _unit_of(self, event: dict[str, Any], watch: Watch) -> int | None:
        """The unit number of the step an event is about; None for a step that is no unit (a
        call at another depth, or of another function)."""
        position = event.get("step")
        if position is None:
            return None
        return watch.unit(event.get("id"), position, self.s.terms.counts(event.get("fn")))

    def _step_done(self, step: int, watch: Watch, now: float) -> None:
        watch.report.executed.append(step)
        if watch.timed_kill_after and watch.timed_kill_after == len(watch.report.executed):
            watch.kill_deadline = now + watch.timed_kill_delay * self._step_seconds
        self._show_progress(watch)

    def _show_progress(self, watch: Watch) -> None:
        """The display's numbers: units done of all, those run by this run, restarts, kills."""
        done = watch.steps_done_before + len(watch.report.executed)
        new = sum(len(c.executed) for c in self.report.children if c is not watch.report)
        self._display.update(done, self._step_count, new + len(watch.report.executed),
                             self.report.restarts, len(self.report.kills))

    def _kill(self, child: Child, watch: Watch, kind: str, step: int | None) -> None:
        child.signal_group(signal.SIGKILL)
        watch.kill = KillReport(child.pid, kind, step)

    def _kill_stalled(self, child: Child, watch: Watch) -> None:
        """The worker is hung (it would not even heartbeat): kill it to restart it. SIGKILL also
        ends a stopped process."""
        silent = time.monotonic() - watch.last_heard
        log.warning("worker %d sent nothing for %.1f s (hung or stopped; --stall-timeout %g): "
                    "SIGKILL, then a restart", child.pid, silent, self.s.stall_timeout)
        child.signal_group(signal.SIGKILL)
        watch.stall = StallReport(child.pid, watch.step_in_flight(), round(silent, 3))

    def _record_end(self, end: ChildEnd, watch: Watch, ours: KillReport | None) -> None:
        """The worker's end in the event log, after the kill or stall that ended it, if any."""
        if ours is not None:
            self._events.add("kill", pid=ours.pid, kind=ours.kind, unit=ours.step, worker=None)
        elif watch.stall is not None and end.signal is signal.SIGKILL:
            self._events.add("stall", pid=end.pid, unit=watch.stall.step, silent_s=watch.stall.silent_s)
        self._events.add("exit", pid=end.pid, exit=end.describe(), ran=len(watch.report.executed),
                         replayed=watch.report.replayed)

    def _log_end(self, end: ChildEnd, watch: Watch, ours: KillReport | None) -> None:
        """One line per worker's end; the reason it gave is on it when the run goes on (a
        restartable end), else it is the run's error, printed once at its end."""
        why = f" ({ours.kind} kill of ours)" if ours else " (stalled)" if watch.stall else ""
        goes_on = watch.report.error and end.returncode in exitcodes.RESTARTABLE
        reason = f" ({watch.report.error})" if goes_on else ""
        log.info("worker %d %s%s%s: ran %d %s, replayed %d", end.pid, end.describe(), why, reason,
                 len(watch.report.executed), self.s.terms.units_maybe, watch.report.replayed)

    # -- store and signals ---------------------------------------------------------------

    def _read_history(self) -> History | None:
        """The workflow's root and direct steps, read from the store (None before it exists)."""
        store = self.s.location.open_readonly()
        if store is None:
            return None
        with store:
            return read_history(store, self.s.root_id)

    def _units(self, history: History) -> list[Promise]:
        """The workflow's units (its direct steps that count), by unit number."""
        return list(self.s.terms.units_of(history).steps.values())

    def _steps_done(self) -> str:
        """'3 of 10 batches', or '3 steps' when their number is not known."""
        history = self._read_history()
        terms = self.s.terms
        done = 0 if history is None else _done(self._units(history))
        if self._step_count is None:
            return f"{done} {terms.units}"
        return f"{done} of {self._step_count} {terms.units}"

    def _signals_forwarded(self) -> _SignalForwarding:
        return _SignalForwarding(self)

    def _sleep_unless_signalled(self, seconds: float) -> bool:
        selector = selectors.DefaultSelector()
        selector.register(self._wakeup_r, selectors.EVENT_READ)
        end = time.monotonic() + seconds
        try:
            while self.stop_signal is None and (left := end - time.monotonic()) > 0:
                selector.select(left)
        finally:
            selector.close()
        return self.stop_signal is not None


_NO_POOL = ", or the worker had no pool process to kill"


def _done(steps: Iterable[Promise]) -> int:
    """How many of `steps` are resolved."""
    return sum(p.state is State.RESOLVED for p in steps)


def _first_unfinished(steps: dict[int, Promise]) -> int:
    """The number of the first direct step not resolved (with a pool, later ones may be)."""
    n = 0
    while n in steps and steps[n].state is State.RESOLVED:
        n += 1
    return n


class _SignalForwarding:
    """SIGINT/SIGTERM set `stop_signal` and wake the loop, which forwards SIGTERM to the worker."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor

    def __enter__(self) -> None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        os.set_blocking(r, False)
        self._fds = (r, w)
        self._sup._wakeup_r = r
        self._old_wakeup = signal.set_wakeup_fd(w)

        def on_signal(signum: int, _frame: object) -> None:
            self._sup.stop_signal = signal.Signals(signum)  # only a flag: the loop reports it

        self._old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._old_wakeup)
        for fd in self._fds:
            os.close(fd)
