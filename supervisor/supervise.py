"""The supervision loop: spawn the worker, watch it, kill it when asked, restart it, report.

Restarts: after a kill of ours, at once; after an unplanned death (a crash or a signal from
elsewhere), with exponential backoff, and at most `max_restarts` times in a row. A worker whose
progress pipe stays silent for `stall_timeout` seconds (it heartbeats every second or so) is
hung, stopped or stuck in C code holding the GIL: it is SIGKILLed and restarted like an
unplanned death. A worker that ends with a status no restart can change (bad input, a failed
batch, a conflicting id) ends the run. The result is read from the store, never taken from the
worker's word.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from store import JsonlStore, Promise, State
from store.locking import LockHeldError, OwnedLock
from workflow.importer import batch_index, exitcodes
from workflow.importer.worker import STEP_TIMEOUT_S, STORE_FILE

from .child import Child, ChildEnd
from .faults import (
    RandomKill,
    attempts_before_kill,
    fail_once_at,
    failpoints_for,
    kill_would_fail,
    store_write_key,
)
from .live import LiveLine
from .report import ChildReport, KillReport, RunReport, StallReport

log = logging.getLogger("supervisor")
MAX_BACKOFF_S = 30.0
STARTUP_GUESS_S = 0.15
STARTUP_SHARE = 0.2  # the share of timed kills that land in start-up or replay
BATCH_GUESS_S = 0.005
HEARTBEAT_S = 1.0  # how often a worker heartbeats: at most a quarter of the stall timeout


class StateDirBusyError(Exception):
    """Another supervisor runs on this state dir."""


@dataclass
class Settings:
    state_dir: Path
    root_id: str
    source: dict[str, Any]
    batch_size: int
    batch_count: int
    kill_at_batches: set[int] = field(default_factory=set)
    random_kills: list[RandomKill] = field(default_factory=list)
    fail_at_batch: int | None = None
    max_restarts: int = 10
    restart_backoff: float = 0.5
    max_attempts: int = 10
    retry_initial: float = 1.0
    grace: float = 10.0
    stall_timeout: float = 180.0
    step_timeout: float = STEP_TIMEOUT_S
    lock_timeout: float = 10.0
    durability: str = "full"


@dataclass
class _Watch:
    """What the supervisor learns about one child while it runs."""

    report: ChildReport
    kill: KillReport | None = None
    stall: StallReport | None = None
    batch_in_flight: int | None = None
    batch_started_at: float = 0.0
    last_attempts: dict[int, int] = field(default_factory=dict)  # batch -> its last allowed attempt
    attempt_in_flight: int = 0
    timed_kill_after: int | None = None  # new batches to let finish before a timed kill
    timed_kill_delay: float = 0.0  # then this fraction of a batch
    kill_deadline: float | None = None
    stop_forwarded: bool = False
    grace_deadline: float | None = None  # when a forwarded stop turns into a SIGKILL
    store_write_key: str | None = None  # the store.append failpoint armed in this child
    spawned_at: float = field(default_factory=time.monotonic)
    last_heard: float = field(default_factory=time.monotonic)  # its last progress line

    def stall_deadline(self, stall_timeout: float) -> float | None:
        """When silence makes the child hung; none once a kill is on its way."""
        if self.kill is not None or self.stall is not None:
            return None
        return self.last_heard + stall_timeout

    def on_last_attempt(self, max_attempts: int) -> bool:
        """Whether the batch in flight runs its last allowed attempt (a kill would fail it)."""
        if self.batch_in_flight is None:
            return False
        return self.attempt_in_flight >= self.last_attempts.get(self.batch_in_flight, max_attempts)


class Supervisor:
    """Runs one import to its end through as many workers as it takes; `run()` reports it."""

    def __init__(self, settings: Settings, live: LiveLine | None = None) -> None:
        self.s = settings
        self.report = RunReport(settings.root_id, str(settings.state_dir))
        self.stop_signal: signal.Signals | None = None
        self._live = live
        self._pending_pauses = set(settings.kill_at_batches)
        self._random = list(settings.random_kills)
        self._batch_seconds = BATCH_GUESS_S
        self._startup_seconds = STARTUP_GUESS_S
        self._wakeup_r = -1

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> RunReport:
        started = time.monotonic()
        lock = OwnedLock(self.s.state_dir / "supervisor.lock")
        try:
            lock.acquire(0, record_owner=True)
        except LockHeldError as exc:
            raise StateDirBusyError(
                f"{self.s.state_dir}: another supervisor is running here ({exc.owner})"
            ) from None
        try:
            with self._signals_forwarded():
                self._loop()
        finally:
            lock.release()
            self.report.elapsed_s = time.monotonic() - started
        return self.report

    def _loop(self) -> None:
        unplanned = 0  # unplanned deaths in a row, with no batch done in between
        while True:
            next_batch, batches = self._progress()
            self._drop_pauses_that_would_fail(batches)
            kill = self._next_kill(next_batch, batches)
            store_write = store_write_key(kill, self.s.root_id, next_batch, self.s.batch_count)
            child = self._spawn(store_write)
            watch = _Watch(ChildReport(child.pid, exit="running"), store_write_key=store_write,
                           last_attempts={b: p.attempts_at_reopen + self.s.max_attempts
                                          for b, p in batches.items()})
            if kill is not None and kill.kind == "timed":
                self._arm_timed_kill(watch, kill, next_batch)
            self._watch(child, watch)
            end = child.reap()
            watch.report.exit = end.describe()
            self.report.children.append(watch.report)
            # A kill counts only if it is what ended the child (it may have exited just before).
            ours = watch.kill if end.signal is signal.SIGKILL else None
            self._log_end(end, watch, ours)
            if ours is not None:
                self.report.kills.append(ours)
            if watch.stall is not None and end.signal is signal.SIGKILL:
                self.report.stalls.append(watch.stall)
            if kill is not None and (ours is None or ours.kind != kill.kind):
                self._random.insert(0, kill)  # not delivered to this child: keep it for the next
            if end.returncode == exitcodes.OK:
                self._finish(end)
                return
            if self.stop_signal is not None:
                self._interrupted(
                    f"worker {end.pid} {end.describe()}; {self._progress()[0]} of "
                    f"{self.s.batch_count} batches done; run the same command again to resume"
                )
                return
            if ours is not None:
                self.report.restarts += 1
                continue
            if end.returncode > 0 and end.returncode not in exitcodes.RESTARTABLE:
                self._failed(end, child, watch)
                return
            unplanned = 1 if watch.report.executed else unplanned + 1
            if unplanned > self.s.max_restarts:
                self.report.error = (
                    f"gave up after {self.s.max_restarts} restarts in a row: worker {end.pid} "
                    f"{end.describe()}; last error: {child.last_error() or 'none'}"
                )
                return
            delay = min(MAX_BACKOFF_S, self.s.restart_backoff * 2 ** (unplanned - 1))
            log.warning("restarting the worker in %g s (restart %d in a row, at most %d)",
                        delay, unplanned, self.s.max_restarts)
            if self._sleep_unless_signalled(delay):
                self._interrupted("while waiting to restart the worker")
                return
            self.report.restarts += 1

    def _interrupted(self, detail: str) -> None:
        self.report.interrupted_by = self.stop_signal.name
        self.report.error = f"interrupted by {self.stop_signal.name}: {detail}"

    def _failed(self, end: ChildEnd, child: Child, watch: _Watch) -> None:
        """The worker ended with a status no restart can change."""
        self.report.error = watch.report.error or child.last_error() or end.describe()
        if end.returncode == exitcodes.FAILED:
            self.report.error += (
                f"; fix the cause, then `python -m supervisor retry --id {self.s.root_id}`"
                " and run the same command again to resume"
            )

    def _finish(self, end: ChildEnd) -> None:
        root = self._store_promise(self.s.root_id)
        if root is None or root.state is not State.RESOLVED:
            self.report.error = f"worker {end.pid} exited 0 but the import's result is not stored"
            return
        self.report.result = root.value
        self.report.undelivered_kills.extend(
            f"kill at batch {b}: the batch was already done" for b in sorted(self._pending_pauses)
        )
        self.report.undelivered_kills.extend(
            f"random {k.kind} kill: the import finished first" for k in self._random
        )

    # -- one child -----------------------------------------------------------------------

    def _spawn(self, store_write: str | None) -> Child:
        points = failpoints_for(self._pending_pauses, store_write) + fail_once_at(self.s.fail_at_batch)
        env = {"DURABLE_FAILPOINTS": orjson.dumps(points).decode()} if points else {}
        args = [
            "--state-dir", str(self.s.state_dir), "--id", self.s.root_id,
            "--source", orjson.dumps(self.s.source).decode(),
            "--batch-size", str(self.s.batch_size),
            "--max-attempts", str(self.s.max_attempts),
            "--retry-initial", str(self.s.retry_initial),
            "--step-timeout", str(self.s.step_timeout),
            "--lock-timeout", str(self.s.lock_timeout),
            "--durability", self.s.durability,
            "--heartbeat", str(min(HEARTBEAT_S, self.s.stall_timeout / 4)),
        ]
        child = Child.spawn(args, env)
        log.debug("spawned worker %d with failpoints %s", child.pid, points)
        return child

    def _next_kill(self, next_batch: int, batches: dict[int, Promise]) -> RandomKill | None:
        """The next random kill, unless it could use up a batch's last attempt: a kill of ours
        must never fail a batch. (A timed kill is checked again when it is due.)"""
        if not self._random:
            return None
        kill = self._random[0]
        target = next_batch + (kill.batch_offset if kill.kind == "store-write" else 0)
        spent = attempts_before_kill(target, batches.get(target), self.s.fail_at_batch)
        if kill_would_fail(spent, self.s.max_attempts):
            return None
        return self._random.pop(0)

    def _drop_pauses_that_would_fail(self, batches: dict[int, Promise]) -> None:
        """Disarm a `--kill-at-batch` whose batch (of a resumed import) is down to its last
        attempt: the kill is reported undelivered, and the batch is not failed by it."""
        for batch in sorted(self._pending_pauses):
            promise = batches.get(batch)
            if promise is not None and promise.state is State.RESOLVED:
                continue  # reported at the end as already done
            spent = attempts_before_kill(batch, promise, self.s.fail_at_batch)
            if kill_would_fail(spent, self.s.max_attempts):
                self._pending_pauses.discard(batch)
                self.report.undelivered_kills.append(
                    f"kill at batch {batch}: it has {max(0, self.s.max_attempts - spent)} of its "
                    f"{self.s.max_attempts} attempts left, and a kill of ours must not spend the last"
                )

    def _arm_timed_kill(self, watch: _Watch, kill: RandomKill, next_batch: int) -> None:
        """A timed kill lands in start-up and replay (a few of them), or a drawn number of new
        batches into the run plus a fraction of a batch: timed by the worker's own pace."""
        remaining = self.s.batch_count - next_batch
        watch.timed_kill_delay = kill.delay
        if kill.share < STARTUP_SHARE:
            watch.kill_deadline = time.monotonic() + kill.delay * self._startup_seconds
        else:
            watch.timed_kill_after = kill.batches_before(remaining, len(self._random) + 1)

    def _watch(self, child: Child, watch: _Watch) -> None:
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
                self._act_on_deadlines(child, watch)
                for key, _ in ready:
                    if key.data == "signal":
                        os.read(self._wakeup_r, 512)
                    elif self._read_pipe(key.fd, key.data, child, watch):
                        selector.unregister(key.fd)
                        open_pipes -= 1
                stall_deadline = watch.stall_deadline(self.s.stall_timeout)
                if open_pipes and stall_deadline is not None and time.monotonic() >= stall_deadline:
                    self._kill_stalled(child, watch)
        finally:
            selector.close()

    def _forward_stop(self, child: Child, watch: _Watch) -> None:
        log.warning("%s: stopping worker %d after its batch in flight", self.stop_signal.name, child.pid)
        child.signal_group(signal.SIGTERM)
        watch.stop_forwarded = True
        watch.grace_deadline = time.monotonic() + self.s.grace
        watch.kill_deadline = None

    def _time_to_next_deadline(self, watch: _Watch) -> float | None:
        deadlines = [watch.kill_deadline, watch.grace_deadline, watch.stall_deadline(self.s.stall_timeout)]
        deadline = min(filter(None, deadlines), default=None)
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _act_on_deadlines(self, child: Child, watch: _Watch) -> None:
        """A timed kill that is due (unless it would take the batch's last attempt), and the
        SIGKILL of a worker that did not stop within its grace after a forwarded signal."""
        now = time.monotonic()
        if watch.kill_deadline is not None and now >= watch.kill_deadline:
            if watch.kill is None and not watch.on_last_attempt(self.s.max_attempts):
                self._kill(child, watch, "timed", watch.batch_in_flight)
            watch.kill_deadline = None
        if watch.grace_deadline is not None and now >= watch.grace_deadline:
            log.warning("worker %d did not stop within %g s; SIGKILL", child.pid, self.s.grace)
            child.signal_group(signal.SIGKILL)
            watch.grace_deadline = None

    def _read_pipe(self, fd: int, pipe: str, child: Child, watch: _Watch) -> bool:
        """Relay stderr or act on progress events (any line is a sign of life); True at EOF."""
        lines, eof = child.read(fd)
        if pipe == "stderr":
            child.relay_stderr(lines)
        elif lines:
            watch.last_heard = time.monotonic()
            for event in child.events(lines):
                self._on_event(event, child, watch)
        return eof

    def _on_event(self, event: dict[str, Any], child: Child, watch: _Watch) -> None:
        kind = event.get("event")
        if kind == "step" and event.get("batch") is not None:
            self._on_batch_step(event, watch)
        elif kind == "step" and event.get("kind") == "replayed" and event.get("id") == self.s.root_id:
            watch.report.replayed = self.s.batch_count  # the import was done: all batches found done
        elif kind == "failpoint" and watch.kill is None:
            name, key = event.get("name"), event.get("key", "")
            if name == "batch.mid" and key.isdigit() and int(key) in self._pending_pauses:
                self._pending_pauses.discard(int(key))
                self._kill(child, watch, "kill-at-batch", int(key))
            elif name == "store.append" and key == watch.store_write_key:
                self._kill(child, watch, "store-write", batch_index(self.s.root_id, key.partition(":")[2]))
        elif kind == "ended":
            watch.report.error = event.get("error")

    def _on_batch_step(self, event: dict[str, Any], watch: _Watch) -> None:
        batch, step = event["batch"], event.get("kind")
        now = time.monotonic()
        if step == "started":
            if watch.batch_started_at == 0.0:  # the first batch this worker starts: start-up is over
                self._startup_seconds = 0.8 * self._startup_seconds + 0.2 * (now - watch.spawned_at)
                if watch.timed_kill_after == 0:
                    watch.kill_deadline = now + watch.timed_kill_delay * self._batch_seconds
            watch.batch_in_flight, watch.batch_started_at = batch, now
            watch.attempt_in_flight = event.get("attempt") or 0
        elif step == "resolved":
            watch.report.executed.append(batch)
            if watch.batch_in_flight == batch:
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (now - watch.batch_started_at)
            watch.batch_in_flight = None
            if watch.timed_kill_after and watch.timed_kill_after == len(watch.report.executed):
                watch.kill_deadline = now + watch.timed_kill_delay * self._batch_seconds
            if self._live is not None:
                self._live.update(batch + 1, self.s.batch_count, self.report)
        elif step == "replayed":
            watch.report.replayed += 1

    def _kill(self, child: Child, watch: _Watch, kind: str, batch: int | None) -> None:
        child.signal_group(signal.SIGKILL)
        watch.kill = KillReport(child.pid, kind, batch)

    def _kill_stalled(self, child: Child, watch: _Watch) -> None:
        """The worker is hung (it would not even heartbeat): kill it to restart it. SIGKILL also
        ends a stopped process."""
        silent = time.monotonic() - watch.last_heard
        log.warning("worker %d sent nothing for %.1f s (hung or stopped; --stall-timeout %g): "
                    "SIGKILL, then a restart", child.pid, silent, self.s.stall_timeout)
        child.signal_group(signal.SIGKILL)
        watch.stall = StallReport(child.pid, watch.batch_in_flight, round(silent, 3))

    def _log_end(self, end: ChildEnd, watch: _Watch, ours: KillReport | None) -> None:
        why = f" ({ours.kind} kill of ours)" if ours else " (stalled)" if watch.stall else ""
        log.info("worker %d %s%s: ran %d batch(es), replayed %d", end.pid, end.describe(), why,
                 len(watch.report.executed), watch.report.replayed)

    # -- store and signals ---------------------------------------------------------------

    def _store_promise(self, promise_id: str) -> Promise | None:
        path = self.s.state_dir / STORE_FILE
        if not path.exists():
            return None
        with JsonlStore(path, readonly=True) as store:
            return store.get(promise_id)

    def _progress(self) -> tuple[int, dict[int, Promise]]:
        """How many batches are done, and the batch promises by batch number."""
        path = self.s.state_dir / STORE_FILE
        if not path.exists():
            return 0, {}
        with JsonlStore(path, readonly=True) as store:
            promises = store.list(self.s.root_id + ".")
        batches = {b: p for p in promises if (b := batch_index(self.s.root_id, p.id)) is not None}
        return sum(p.state is State.RESOLVED for p in batches.values()), batches

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
