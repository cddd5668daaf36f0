"""Which kills a run delivers, and where: pure decisions, so tests can check them without processes.

`--kill-at-batch K` arms the worker's `batch.mid` failpoint: the worker announces itself halfway
through batch K's rows, before its transaction commits, and waits; the supervisor SIGKILLs it.
So the kill lands while batch K is in flight every time, not by luck of timing.

`--kill-random N` draws N kills from a seeded generator. Each is one of
  - "timed": SIGKILL after a random delay since the child started (startup, replay, mid-batch,
    between batches: wherever it falls);
  - "store-write": arm the store's `store.append` failpoint on the resolve of a batch that is
    about to run, so the worker is killed halfway through writing that store line.
The choices are reproducible with `--seed`; the exact moment of a timed kill is real time.
A fifth of the timed kills land in start-up or replay (a drawn fraction of the measured start-up
time); the others wait for the child to finish a drawn number of new batches, then a drawn
fraction of a batch's duration, so they land mid-batch or between batches whatever the speed
of the machine.

No kill of ours may spend a batch's last attempt (the batch would be rejected for a fault we
made): `attempts_before_kill` and `kill_would_fail` decide it, for flags checked up front and
for batches whose attempts a resumed import already partly used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from store import Promise


@dataclass(frozen=True, slots=True)
class RandomKill:
    kind: str  # "timed" or "store-write"
    share: float  # timed: which share of its part of the remaining batches to let finish first
    delay: float  # timed: then wait this fraction of a batch (or of start-up)
    batch_offset: int  # store-write: how many batches after the first unfinished one

    def batches_before(self, remaining: int, kills_left: int) -> int:
        """How many new batches a timed kill lets finish; kills share the remaining batches."""
        return int(self.share * remaining / max(1, kills_left))


def attempts_before_kill(batch: int, promise: Promise | None, fail_at_batch: int | None) -> int:
    """Attempts of `batch` spent (since a reopen) before a kill of ours lands in it: those
    already started, plus the injected failure of its first attempt if that is still to come."""
    started = promise.attempts if promise is not None else 0
    since_reopen = promise.attempts_since_reopen if promise is not None else 0
    return since_reopen + (batch == fail_at_batch and started == 0)


def kill_would_fail(spent_before: int, max_attempts: int) -> bool:
    """Whether a kill after `spent_before` attempts would take the batch's last attempt."""
    return spent_before + 1 >= max_attempts


MAX_RANDOM_KILLS = 1000  # each kill costs a worker restart; more cannot land in any sane run


def random_kills(count: int, seed: int | None) -> list[RandomKill]:
    rng = random.Random(seed)
    kills = []
    for _ in range(count):
        kind = "store-write" if rng.random() < 0.3 else "timed"
        kills.append(RandomKill(kind, rng.random(), rng.random(), rng.randrange(3)))
    return kills


def store_write_key(kill: RandomKill | None, root_id: str, next_batch: int, batches: int) -> str | None:
    """The `store.append` failpoint key of a store-write kill: the resolve of a batch ahead."""
    if kill is None or kill.kind != "store-write" or next_batch + kill.batch_offset >= batches:
        return None
    return f"resolve:{root_id}.{next_batch + kill.batch_offset}"


def failpoints_for(pause_batches: set[int], store_write: str | None) -> list[dict[str, str]]:
    """The failpoints to arm in the next child (DURABLE_FAILPOINTS entries)."""
    points = [{"name": "batch.mid", "key": str(b), "action": "pause"} for b in sorted(pause_batches)]
    if store_write is not None:
        points.append({"name": "store.append", "key": store_write, "action": "pause"})
    return points


def fail_once_at(batch: int | None) -> list[dict[str, str]]:
    """`--fail-at-batch K`: the first attempt of batch K raises (and is retried with backoff)."""
    if batch is None:
        return []
    return [{"name": "batch.fail", "key": f"{batch}/1", "action": "raise"}]
