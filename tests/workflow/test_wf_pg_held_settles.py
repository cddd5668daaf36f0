"""A step's settle held back and written with the next step's creation (PostgreSQL), attacked.

What the store and runner promise (store/base.py `hold`, store/pg.py): the runner's sequential
loop lets each step's settle wait for the next write under the root, so that a step costs one
transaction; the settle is written before (or with) anything that follows it, never after a
creation it led to; a kill loses at most that one settle, and the replay runs its step again.
The tests read the database from another connection, and kill real processes with SIGKILL.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from store import State, StoreUnavailableError, open_store, pg, pg_pipe
from store.pg import FencedError, PgStore
from workflow import Context, Runner, register

HERE = Path(__file__).resolve().parent
CHILD = HERE / "held_child.py"
sys.path.insert(0, str(HERE))
from held_child import ROOT_ID, chain  # noqa: E402


def expected_chain(n: int) -> list[int]:
    values, value = [], 1
    for i in range(n):
        value = value * 31 % 1_000_003 + i
        values.append(value)
    return values


@pytest.fixture
def held_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """A held settle stays held until a write takes it along (the flusher waits 30 s, not 2 ms)."""
    monkeypatch.setattr(pg, "_HOLD_S", 30.0)


@pytest.mark.usefixtures("held_long")
def test_a_held_settle_is_written_with_the_next_creation_and_not_before(pg_url: str) -> None:
    with open_store(pg_url) as owner, open_store(pg_url) as other, owner.own("w"):
        owner.create("w.0", {"n": 0})
        owner.start_attempt("w.0")
        held = owner.resolve("w.0", 7, hold=True)
        assert held.state is State.RESOLVED and owner.get("w.0").value == 7  # the owner sees it
        assert _state(other, "w.0") is not State.RESOLVED  # written nowhere yet
        owner.create("w.1", {"n": 1})
        owner.start_attempt("w.1")
        assert other.get("w.0").value == 7 and other.get("w.1").attempts == 1  # both, together


@pytest.mark.usefixtures("held_long")
@pytest.mark.parametrize("then", ["sync", "own_end", "close", "settle"])
def test_a_held_settle_is_written_by_whatever_comes_next(pg_url: str, then: str) -> None:
    other = open_store(pg_url)
    owner = open_store(pg_url)
    with owner.own("w"):
        owner.create("w.0", None)
        owner.start_attempt("w.0")
        owner.resolve("w.0", "zero", hold=True)
        if then == "sync":
            owner.sync()
        elif then == "settle":
            owner.create("w.1", None)
            owner.start_attempt("w.1")  # written with its creation...
            owner.resolve("w.1", "one")  # ...or, had it been made with another, with this settle
        if then in ("sync", "settle"):
            assert other.get("w.0").value == "zero"
        if then == "close":
            owner.close()
    owner.close()
    assert other.get("w.0").value == "zero"
    other.close()


@pytest.mark.usefixtures("held_long")
def test_a_held_settle_of_an_owner_that_lost_its_lease_is_never_written(pg_url: str) -> None:
    with open_store(pg_url, lease_s=0.5) as owner, open_store(pg_url) as other:
        with pytest.raises(FencedError), owner.own("w"):
            owner.create("w.0", None)
            owner.start_attempt("w.0")
            owner.resolve("w.0", 1, hold=True)
            with other._safe.connection() as conn:  # another driver took over meanwhile
                conn.execute("UPDATE leases SET epoch = epoch + 1 WHERE root = 'w'")
            owner.create("w.1", None)
            owner.start_attempt("w.1")
        assert _state(other, "w.0") is not State.RESOLVED and other.get("w.1") is None


def _state(store, promise_id: str) -> State | None:
    """As another connection sees it (a creation sent without waiting may not have landed)."""
    promise = store.get(promise_id)
    return None if promise is None else promise.state


@pytest.mark.usefixtures("held_long")  # the flusher, not this test, covers a slow machine's gaps
def test_a_run_writes_each_settle_in_the_transaction_of_the_next_creation(
    pg_url: str, tmp_path: Path
) -> None:
    """The rows themselves say it: a step's settle row and the next step's promise row were
    inserted by one transaction (the same xmin), so a step costs one commit."""
    n = 50
    with open_store(pg_url) as store:
        value = Runner(store, dependencies={"log": str(tmp_path / "steps.log")}).run(ROOT_ID, chain, n)
        with store._safe.connection() as conn:
            settles = dict(conn.execute("SELECT id, xmin::text FROM settles").fetchall())
            creations = dict(conn.execute("SELECT id, xmin::text FROM promises").fetchall())
    assert value == expected_chain(n)[-1]
    together = [settles[f"{ROOT_ID}.{i}"] == creations[f"{ROOT_ID}.{i + 1}"] for i in range(n - 1)]
    assert all(together), together.index(False)
    assert settles[ROOT_ID] != creations[ROOT_ID]  # the root's settle is the run's last commit


@register(name="held.slow")
def slow(value: str) -> str:
    time.sleep(0.2)
    return value


@register(name="held.inner")
def inner(ctx: Context, value: str) -> Generator[Any, Any, str]:
    time.sleep(0.5)  # its own code, before its first step: a step thread writes meanwhile
    return (yield ctx.run(slow, value + "!"))


@register(name="held.mixed")
def mixed(ctx: Context) -> Generator[Any, Any, list[str]]:
    begun = yield ctx.begin(slow, "begun")
    first = yield ctx.run(slow, "first")  # its settle is held while `inner` is created
    second = yield ctx.run(inner, first)
    return [(yield begun), first, second]


def test_a_step_thread_never_writes_a_creation_while_a_settle_is_held(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step thread writing the creations held back (at its settle) takes the settles held
    back along first, in one go: the driver cannot hold a settle and create a call from its
    value in between (slowed down here to make that moment wide)."""
    monkeypatch.setattr(pg, "_HOLD_S", 30.0)  # only a write takes a held settle along
    settles_first = PgStore._write_held_settles

    def slowed(self: PgStore, lease: Any) -> bool:
        wrote = settles_first(self, lease)
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.3)
        return wrote

    ahead: list[Any] = []
    fenced = PgStore._fenced

    def watched(self: PgStore, pool: Any, action: str, lease: Any, sql: str, params: dict) -> Any:
        if action.startswith("creating") and lease is not None and lease.held_settles:
            ahead.append((params["ids"], [h.id for h in lease.held_settles]))
        return fenced(self, pool, action, lease, sql, params)

    monkeypatch.setattr(PgStore, "_write_held_settles", slowed)
    monkeypatch.setattr(PgStore, "_fenced", watched)
    with open_store(pg_url) as store:
        assert Runner(store, workers=2).run("mixed", mixed) == ["begun", "first", "first!"]
    assert ahead == [], "creations written while a settle they may come from was held"


def test_a_settle_held_while_the_workflow_computes_is_written_within_moments(
    pg_url: str, tmp_path: Path
) -> None:
    """No creation comes to take it along (the workflow's own code runs for a second): it is
    written on its own, and a kill then does not run the step again."""
    log = tmp_path / "steps.log"
    child = subprocess.Popen([sys.executable, str(CHILD), pg_url, str(log), "2", "1"],
                             stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # the step returned; the workflow computes
        with open_store(pg_url) as other:
            assert _state(other, f"{ROOT_ID}.0") is State.RESOLVED
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    rerun = subprocess.run([sys.executable, str(CHILD), pg_url, str(log), "2", "1"],
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1]


def test_a_held_settle_whose_answer_was_lost_is_sent_again_harmlessly(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transaction with a held settle committed, but the connection died before its answer:
    the run fails as the database being unavailable (a restartable failure), the settle sent
    again at the end of own() is found there already, and the lease is given up."""
    sent = pg_pipe.Pipe.settle_and_create
    calls = []

    def answer_lost(self: pg_pipe.Pipe, *args: Any, **kwargs: Any) -> bool:
        written = sent(self, *args, **kwargs)
        calls.append(written)
        if len(calls) == 3:
            self._conn.finish()
            raise StoreUnavailableError("the connection was lost while its answer was on the way")
        return written

    monkeypatch.setattr(pg_pipe.Pipe, "settle_and_create", answer_lost)
    with open_store(pg_url, lease_s=30) as store, pytest.raises(StoreUnavailableError) as failed:
        Runner(store, dependencies={"log": "/dev/null"}).run(ROOT_ID, chain, 10)
    assert "answer" in str(failed.value)
    with open_store(pg_url) as other:
        assert _state(other, f"{ROOT_ID}.2") is State.RESOLVED
        with other.own(ROOT_ID):  # given up at once: no wait for its expiry
            pass


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_at_most_one_settle_and_never_orders_a_creation_first(
    pg_url: str, tmp_path: Path
) -> None:
    n, kills = 400, 0
    log = tmp_path / "steps.log"
    rng = random.Random(20261129)
    expected = expected_chain(n)
    while True:
        child = subprocess.Popen([sys.executable, str(CHILD), pg_url, str(log), str(n)],
                                 stdout=subprocess.PIPE, text=True)
        if kills < 8:
            time.sleep(rng.uniform(0.3, 1.2))  # start-up included: some kills land before a step
        if child.poll() is None and kills < 8:
            child.send_signal(signal.SIGKILL)
            child.wait()
            kills += 1
            _check_prefix(pg_url, expected)
            continue
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        assert json.loads(out) == expected[-1]
        break
    _check_prefix(pg_url, expected)
    runs = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert sorted(set(runs)) == list(range(n))
    assert len(runs) - n <= kills, f"{len(runs) - n} steps ran again after {kills} kills"


def _check_prefix(url: str, expected: list[int]) -> None:
    """From the database: the steps settled are a prefix with the right values, and a step
    created (at most the one after them) has every step before it settled."""
    with open_store(url) as store:
        steps = [p for p in store.list(f"{ROOT_ID}.")]
    settled = [p for p in steps if p.state is State.RESOLVED]
    assert [p.value for p in settled] == expected[:len(settled)]
    assert [p.id for p in settled] == [f"{ROOT_ID}.{i}" for i in range(len(settled))]
    assert len(steps) - len(settled) <= 1, [p.id for p in steps if p.state is not State.RESOLVED]
