"""What the supervisor learns about one worker while it runs: its steps in flight (several at
once when the worker has a pool), the kills armed for it, and its deadlines. No I/O here.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from .faults import Point, RandomKill
from .report import ChildReport, KillReport, StallReport


@dataclass
class Flight:
    """One step the worker said it started and has not yet said it settled."""

    step: int | None  # its unit number, if it is one of the workflow's units
    attempt: int
    started_at: float
    retrying: bool = False  # that attempt failed; the next waits for its backoff


@dataclass
class Watch:
    """One worker, as its progress pipe and the supervisor's own kills tell it."""

    report: ChildReport
    steps_done_before: int = 0  # units resolved before this child started
    unit_of: dict[str, int] = field(default_factory=dict)  # a unit step's id -> its unit number
    other_steps: list[int] = field(default_factory=list)  # step numbers of direct steps no unit
    pauses: dict[Point, int] = field(default_factory=dict)  # kill-at-step failpoint -> its unit
    paused: int | None = None  # the step paused at its failpoint whose kill waits (see Supervisor)
    kill: KillReport | None = None  # the kill of the whole worker, once sent
    stall: StallReport | None = None
    flights: dict[str, Flight] = field(default_factory=dict)  # id (at any depth) -> its attempt
    first_step_at: float | None = None  # when the worker started its first step
    last_attempts: dict[str, int] = field(default_factory=dict)  # id -> its last allowed attempt
    random_kill: RandomKill | None = None  # the random kill armed for this worker
    timed_kill_after: int | None = None  # executed steps to reach before a timed or pool kill
    timed_kill_delay: float = 0.0  # then this fraction of a step
    kill_deadline: float | None = None
    unplaced_pool_kills: list[KillReport] = field(default_factory=list)  # their step not yet known
    stop_forwarded: bool = False
    grace_deadline: float | None = None  # when a forwarded stop turns into a SIGKILL
    store_write: int | None = None  # the step whose resolve the store.append failpoint tears
    spawned_at: float = field(default_factory=time.monotonic)
    last_heard: float = field(default_factory=time.monotonic)  # its last progress line

    def stall_deadline(self, stall_timeout: float) -> float | None:
        """When silence makes the child hung; none once a kill is on its way."""
        if self.kill is not None or self.stall is not None:
            return None
        return self.last_heard + stall_timeout

    def on_last_attempt(self, max_attempts: int, besides: str | None = None) -> bool:
        """Whether a step in flight (other than `besides`) runs its last allowed attempt: a kill
        of the worker would fail it."""
        return any(f.attempt >= self.last_attempts.get(promise_id, max_attempts)
                   for promise_id, f in self.flights.items()
                   if promise_id != besides and not f.retrying)

    def running(self, promise_id: str) -> bool:
        """Whether an attempt of the step runs now (in flight, not waiting to be retried)."""
        flight = self.flights.get(promise_id)
        return flight is not None and not flight.retrying

    def unit(self, promise_id: str, step: int, is_unit: bool) -> int | None:
        """The unit number of the direct step `step` (None if it is no unit): its step number
        less the direct steps before it that are no units. The workflow makes those in its own
        thread and waits for them (an import's plan steps), so they are all met before any
        unit after them, while a pool's threads meet the units themselves in any order."""
        if not is_unit:
            if step not in self.other_steps:
                bisect.insort(self.other_steps, step)
            return None
        if promise_id not in self.unit_of:
            self.unit_of[promise_id] = step - bisect.bisect_left(self.other_steps, step)
        return self.unit_of[promise_id]

    def id_of(self, unit: int) -> str | None:
        """The id of unit number `unit`, once met."""
        return next((promise_id for promise_id, n in self.unit_of.items() if n == unit), None)

    def step_in_flight(self) -> int | None:
        """The lowest unit in flight (the one a kill of the worker is said to land in)."""
        return min((f.step for f in self.flights.values() if f.step is not None), default=None)

    def started(self, promise_id: str, step: int | None, attempt: int, now: float) -> None:
        """Follow a step's new attempt."""
        self.flights[promise_id] = Flight(step, attempt, now)
        if self.first_step_at is None:
            self.first_step_at = now

    def retrying(self, promise_id: str) -> None:
        """The step's attempt failed; it waits to be retried."""
        if promise_id in self.flights:
            self.flights[promise_id].retrying = True

    def settled(self, promise_id: str) -> Flight | None:
        """The step is no longer in flight; its attempt, if the worker said it started."""
        return self.flights.pop(promise_id, None)
