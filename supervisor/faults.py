"""Which kills a run delivers, and where: pure decisions, so tests can check them without processes.

`--kill-at-step N` arms the runtime's `step.started` failpoint of step N (`<root>.<N>`): the
worker announces itself once the step's attempt is recorded, before its function runs, and
waits; the supervisor SIGKILLs it. So the kill lands while step N is in flight every time, not by
luck of timing. An application may name another failpoint inside its steps (the import's
`--kill-at-batch K` waits halfway through batch K's rows, keyed by the batch number, whatever
the position of that batch among the root's calls).

`--kill-random N` draws N kills from a seeded generator. Each is one of
  - "timed": SIGKILL the worker's process group after a random delay since the child started
    (startup, replay, mid-step, between steps: wherever it falls);
  - "store-write": arm the store's `store.append` failpoint on the resolve of a step that is
    about to run (any direct step: an import's plan step too), so the worker is killed halfway
    through writing that store line;
  - "pool" (only when the worker has a pool, `--workers` above 1): a timed kill of one process
    of the worker's pool, not of the worker. It costs the attempt of the step that process ran;
    the worker re-dispatches the step and runs on. About half of the timed kills become pool
    kills, drawn after all the kinds, so a seed draws the same kinds whatever the pool.
When the number of units is known, every kill is delivered, spread over the run: it also waits
at the kill point of a unit far enough into the run to leave a unit to each kill after it, and
lands there (reported as a "mid-<unit>" kill) if its drawn moment has not come by then.
The choices are reproducible with `--seed`; the exact moment of a timed kill is real time (and
which step a pool process runs when it is killed, the pool's scheduling).
A fifth of the timed kills land in start-up or replay (a drawn fraction of the measured start-up
time); the others wait for the child to finish a drawn number of new units (a share of the units
left, when their number is known; none when it is not, as for a file's import until it is
planned to its end), then a drawn fraction of a step's duration, so they land mid-step or between
steps whatever the speed of the machine.

No kill of ours may spend a step's last attempt (the step would be rejected for a fault we
made): `attempts_before_kill` and `kill_would_fail` decide it, for flags checked up front and
for steps whose attempts a resumed run already partly used. With a pool, a kill of the worker
costs an attempt of every step in flight, not only of the one it aims at: `steps_in_reach`
names the steps that may be in flight when it lands.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from store import Promise, failpoints
from workflow.ids import child_id

Point = tuple[str, str]  # a failpoint: (name, key)


@dataclass(frozen=True, slots=True)
class RandomKill:
    kind: str  # "timed", "store-write" or "pool"
    share: float  # timed, pool: which share of its part of the remaining steps to let finish first
    delay: float  # timed, pool: then wait this fraction of a step (or of start-up)
    batch_offset: int  # store-write: how many steps after the first unfinished one
    victim: float = 0.0  # pool: which of the pool's processes (a fraction of their number)
    unit: int | None = None  # the unit by which it lands at the latest (see latest_kill_unit)

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


POOL_SHARE = 0.5  # of the timed kills, with a pool: those that kill one pool process


def random_kills(count: int, seed: int | None, workers: int = 1) -> list[RandomKill]:
    """`count` kills drawn from `seed`; with a pool (`workers` above 1), some of the timed ones
    are pool kills, drawn after all the kinds so that those stay what they are without a pool."""
    rng = random.Random(seed)
    kills = []
    for _ in range(count):
        kind = "store-write" if rng.random() < 0.3 else "timed"
        kills.append(RandomKill(kind, rng.random(), rng.random(), rng.randrange(3)))
    if workers == 1:
        return kills
    targets = [(rng.random(), rng.random()) for _ in kills]
    return [replace(k, kind="pool", victim=victim) if k.kind == "timed" and pick < POOL_SHARE else k
            for k, (pick, victim) in zip(kills, targets, strict=True)]


def in_a_database(kills: list[RandomKill]) -> list[RandomKill]:
    """The kills for a store in PostgreSQL, which has no store line to tear: its store-write
    kills become timed ones (each lands while the worker runs, as the store-write's would)."""
    return [replace(k, kind="timed") if k.kind == "store-write" else k for k in kills]


def latest_kill_unit(kills_left: int, total: int | None, first: int, unit_kills: dict[int, int],
                     would_fail: Callable[[int], bool]) -> int | None:
    """The unit by which the next random kill must have landed for all `kills_left` to be
    delivered, spread over the units left (`total` units, `first` the first unfinished one);
    None when their number is not known, or no unit can take one (it is then undelivered).

    A drawn moment can fall late (a worker runs on while the supervisor reacts, and each kill
    ends a worker), so a kill also waits at this unit's kill point (the one a kill-at-step
    uses) and lands there if its moment has not come: the last unit that leaves one unit to
    each kill after it; with more kills than units, the units left share them, at most
    ceil(kills / units) each (`unit_kills`: late kills delivered there so far), and never at a
    unit whose last attempt it would spend (`would_fail`).
    """
    if total is None or kills_left == 0:
        return None
    for n in range(first + max(0, total - first - kills_left), total):
        share = -(-kills_left // (total - n))
        if unit_kills.get(n, 0) < share and not would_fail(n):
            return n
    return None


def steps_in_reach(target: int, unfinished: Iterable[int], workers: int) -> set[int]:
    """The steps that may be in flight when a kill of the worker lands in step `target`: that
    one alone without a pool; with one, also every step begun and not resolved (`unfinished`):
    the pool may run any of them beside it, whatever their order."""
    if workers == 1:
        return {target}
    return {target, *unfinished}


def pool_victim(kill: RandomKill, pids: list[int]) -> int | None:
    """The pool process a pool kill takes, among the pool's `pids` (None: no pool right now)."""
    if not pids:
        return None
    ordered = sorted(pids)
    return ordered[min(len(ordered) - 1, int(kill.victim * len(ordered)))]


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
