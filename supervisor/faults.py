"""Which kills a run delivers, and where: pure decisions, so tests can check them without processes.

`--kill-at-step N` arms the runtime's `step.started` failpoint of step N (`<root>.<N>`): the
worker announces itself once the step's attempt is recorded, before its function runs, and
waits; the supervisor SIGKILLs it. So the kill lands while step N is in flight every time, not by
luck of timing. An application may name another failpoint inside its steps (the import's
`--kill-at-batch K` waits halfway through batch K's rows, keyed by the batch number, whatever
the position of that batch among the root's calls).

`--kill-random N` draws N kills from a seeded generator. Each is one of
  - "timed": SIGKILL after a random delay since the child started (startup, replay, mid-step,
    between steps: wherever it falls);
  - "store-write": arm the store's `store.append` failpoint on the resolve of a step that is
    about to run (any direct step: an import's plan step too), so the worker is killed halfway
    through writing that store line.
The choices are reproducible with `--seed`; the exact moment of a timed kill is real time.
A fifth of the timed kills land in start-up or replay (a drawn fraction of the measured start-up
time); the others wait for the child to finish a drawn number of new units (a share of the units
left, when their number is known; none when it is not, as for a file's import until it is
planned to its end), then a drawn fraction of a step's duration, so they land mid-step or between
steps whatever the speed of the machine.

No kill of ours may spend a step's last attempt (the step would be rejected for a fault we
made): `attempts_before_kill` and `kill_would_fail` decide it, for flags checked up front and
for steps whose attempts a resumed run already partly used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from store import Promise, failpoints
from workflow.ids import child_id

Point = tuple[str, str]  # a failpoint: (name, key)


@dataclass(frozen=True, slots=True)
class RandomKill:
    kind: str  # "timed" or "store-write"
    share: float  # timed: which share of its part of the remaining steps to let finish first
    delay: float  # timed: then wait this fraction of a step (or of start-up)
    batch_offset: int  # store-write: how many steps after the first unfinished one

    def steps_before(self, remaining: int | None, kills_left: int) -> int:
        """How many new steps a timed kill lets finish; kills share the remaining steps. With
        their number unknown, none: the kill lands in or after the first new step."""
        if remaining is None:
            return 0
        return int(self.share * remaining / max(1, kills_left))


def attempts_before_kill(promise: Promise | None, planned_failure: bool) -> int:
    """Attempts of a step (`promise`, None before it is created) spent since a reopen before a
    kill of ours lands in it: those already started, plus the failure of its first attempt if
    one is planned (`planned_failure`: it is, or may be, the step `--fail-at-<unit>` names) and
    still to come."""
    started = promise.attempts if promise is not None else 0
    since_reopen = promise.attempts_since_reopen if promise is not None else 0
    return since_reopen + (planned_failure and started == 0)


def kill_would_fail(spent_before: int, max_attempts: int) -> bool:
    """Whether a kill after `spent_before` attempts would take the step's last attempt."""
    return spent_before + 1 >= max_attempts


MAX_RANDOM_KILLS = 1000  # each kill costs a worker restart; more cannot land in any sane run


def random_kills(count: int, seed: int | None) -> list[RandomKill]:
    rng = random.Random(seed)
    kills = []
    for _ in range(count):
        kind = "store-write" if rng.random() < 0.3 else "timed"
        kills.append(RandomKill(kind, rng.random(), rng.random(), rng.randrange(3)))
    return kills


def store_write_step(kill: RandomKill | None, next_step: int) -> int | None:
    """The direct step whose resolve a store-write kill tears: one just ahead of `next_step`,
    the first unfinished one (a step the run never makes is never torn: the kill is then
    reported undelivered)."""
    if kill is None or kill.kind != "store-write":
        return None
    return next_step + kill.batch_offset


def at_step_start(root_id: str, step: int) -> Point:
    """Where `--kill-at-step` waits: step `step`'s attempt recorded, its function not yet run."""
    return failpoints.STEP_STARTED, failpoints.step_started_key(child_id(root_id, step))


def in_store_write(root_id: str, step: int) -> Point:
    """Where a store-write kill waits: halfway through writing the resolve of step `step`."""
    return failpoints.STORE_APPEND, failpoints.store_append_key("resolve", child_id(root_id, step))


def paused_at(points: list[Point]) -> list[dict[str, str]]:
    """The DURABLE_FAILPOINTS entries that make a worker wait at `points` to be killed."""
    return [failpoints.entry(name, key, "pause") for name, key in points]


def kill_budget_error(
    kill_at: list[int], planned_failure: int | None, max_attempts: int, unit: str
) -> str | None:
    """Why a kill-at-step (`--kill-at-<unit> N`) would spend its step's last attempt, if it would."""
    if planned_failure is not None and max_attempts < 2:
        return (f"--fail-at-{unit} {planned_failure} needs --max-attempts 2 or more, not "
                f"{max_attempts}: the injected failure spends the {unit}'s only attempt and fails "
                "the run for good")
    for step in sorted(kill_at):
        spent = attempts_before_kill(None, step == planned_failure)
        if kill_would_fail(spent, max_attempts):
            failure = f", the injected --fail-at-{unit} failure one more," if spent else ""
            return (f"--kill-at-{unit} {step} needs --max-attempts {spent + 2} or more, not "
                    f"{max_attempts}: the planned kill spends one attempt of {unit} {step}"
                    f"{failure} and the {unit} needs one more to finish")
    return None
