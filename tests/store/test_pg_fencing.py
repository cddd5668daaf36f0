"""PostgreSQL leases and fencing, attacked from outside with real processes and the real server.

What PgStore promises (store/pg.py): one owner per root workflow through a lease that a
heartbeat renews; a new owner only once it has expired (at once if its holder died on this
machine), with the epoch bumped; every write under an owned root fenced by the epoch in the
same statement, so an owner paused past its lease writes nothing when it resumes, and a lease
once lost stays lost. Each test reads the database itself to check it.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgproc import children, lease, query, snapshot, wait_until

from store import (
    MemoryStore,
    State,
    StoreError,
    WorkflowBusyError,
    normalize,
    open_store,
    same_json,
)
from store.pg import FencedError, PgStore

CHILD = Path(__file__).resolve().parent / "pg_lease_child.py"
ROOT = "import/fenced"


def pg(url: str, **options: Any) -> PgStore:
    return open_store(url, **options)


# -- every write of an owner that lost its lease is refused, by the statement itself ----------

# Each write an owner can make under its root. Run with a lease of 30 s, so the heartbeat does
# not find the loss first: the statement's own fence has to refuse it.
WRITES: dict[str, Callable[[PgStore], Any]] = {
    "held creation, sent with its first attempt, then settled": lambda s: (
        s.create(f"{ROOT}.9", {"n": 9}), s.start_attempt(f"{ROOT}.9"), s.resolve(f"{ROOT}.9", 9)),
    "held creations, written with the first attempt of one": lambda s: (
        s.create(f"{ROOT}.8", {"n": 8}), s.create(f"{ROOT}.9", {"n": 9}), s.start_attempt(f"{ROOT}.9")),
    "held creation, written before a list": lambda s: (s.create(f"{ROOT}.9", {"n": 9}), s.list("")),
    "held creation, written before a settle": lambda s: (
        s.create(f"{ROOT}.9", {"n": 9}), s.resolve(f"{ROOT}.0", "late")),
    "held creation, written by close": lambda s: (s.create(f"{ROOT}.9", {"n": 9}), s.close()),
    "start_attempt": lambda s: s.start_attempt(f"{ROOT}.0"),
    "resolve": lambda s: s.resolve(f"{ROOT}.0", "late"),
    "resolve, deferred": lambda s: s.resolve(f"{ROOT}.0", "late", defer_sync=True),
    "reject": lambda s: s.reject(f"{ROOT}.0", {"type": "Late", "message": "late"}),
    "reopen": lambda s: s.reopen(f"{ROOT}.1", "again"),
    "resolve the root": lambda s: s.resolve(ROOT, "late"),
    "enqueue": lambda s: s.enqueue(f"{ROOT}.0", {"max_attempts": 1}),
}


@contextlib.contextmanager
def owner_with_history(url: str, root: str = ROOT) -> Iterator[tuple[PgStore, contextlib.ExitStack]]:
    """A store owning `root` with a pending step `root`.0 (one attempt) and a rejected `root`.1."""
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(pg(url, lease_s=30, lock_timeout=2))
        stack.enter_context(store.own(root))
        store.create(root, {"fn": "wf"})
        store.create(f"{root}.0", {"n": 0})
        store.start_attempt(f"{root}.0")
        store.create(f"{root}.1", {"n": 1})
        store.start_attempt(f"{root}.1")
        store.reject(f"{root}.1", {"type": "E", "message": "no"})
        yield store, stack


@pytest.mark.parametrize("taken_over", [True, False], ids=["taken-over", "expired"])
def test_every_write_after_the_lease_is_lost_is_refused_and_writes_nothing(
    pg_url: str, taken_over: bool
) -> None:
    for write in sorted(WRITES):
        with owner_with_history(pg_url) as (old, stack):
            # The owner "paused" past its lease: its lease row expired behind its back.
            query(pg_url, "UPDATE leases SET expires_at = now() - interval '1 second'")
            if taken_over:
                new = stack.enter_context(pg(pg_url, lease_s=30, lock_timeout=2))
                stack.enter_context(new.own(ROOT))
                assert lease(pg_url, ROOT)[1] == 2  # the epoch was bumped
            before = snapshot(pg_url)
            with pytest.raises(FencedError, match=f"lost the lease of workflow {ROOT}"):
                WRITES[write](old)
            assert snapshot(pg_url) == before, write
        query(pg_url, "TRUNCATE promises, settles, leases, tasks")


def test_an_owner_whose_lease_ran_out_is_refused_the_first_attempt_of_a_new_step(pg_url: str) -> None:
    """As in a process stopped past its lease: its heartbeat stopped with it. (A step's creation
    is sent without waiting for the answer only while the lease was renewed less than half a
    lease period ago; a lease the database ends sooner, by hand or by a jump of its clock, is
    found out at the step's settle.)"""
    with pg(pg_url, lease_s=1, lock_timeout=2) as old, old.own(ROOT):
        old.create(ROOT, {"fn": "wf"})
        old._renewing.set()  # the heartbeat stops, as in a stopped process
        old._heartbeat.join()
        time.sleep(1.2)
        with pg(pg_url, lease_s=30, lock_timeout=5) as new, new.own(ROOT):
            old.create(f"{ROOT}.9", {"n": 9})
            with pytest.raises(FencedError):
                old.start_attempt(f"{ROOT}.9")  # else the caller runs the step, beside the new owner
            assert new.get(f"{ROOT}.9") is None


def test_a_lease_once_lost_stays_lost_even_if_its_row_looked_valid_again(pg_url: str) -> None:
    with owner_with_history(pg_url) as (old, _):
        query(pg_url, "UPDATE leases SET expires_at = now() - interval '1 second'")
        with pytest.raises(FencedError):
            old.resolve(f"{ROOT}.0", "late")
        # as if its heartbeat had renewed it after all: this store object writes nothing more
        query(pg_url, "UPDATE leases SET expires_at = now() + interval '30 seconds'")
        before = snapshot(pg_url)
        for write in sorted(WRITES):
            with pytest.raises(FencedError):
                WRITES[write](old)
        assert snapshot(pg_url) == before


def test_a_writing_owner_stopped_past_its_lease_writes_nothing_after_a_takeover(pg_url: str) -> None:
    with children() as start, pg(pg_url, lease_s=1, lock_timeout=10) as new:
        child = start(CHILD, pg_url, ROOT, 1, "write")
        child.wait_for(lambda e: e.get("n") == 5)
        child.signal(signal.SIGSTOP)
        time.sleep(0.1)  # a statement it had sent is done by now
        measured = time.monotonic()
        left = lease(pg_url, ROOT)[2]
        assert left > 0, "the lease had expired while the child ran: the test proves nothing"
        with new.own(ROOT):
            took = time.monotonic() - measured
            assert took >= left, f"taken over after {took:.2f} s, before the lease ended ({left:.2f} s)"
            assert lease(pg_url, ROOT)[1] == 2
            new.create(f"{ROOT}.new", None)
            new.start_attempt(f"{ROOT}.new")
            new.resolve(f"{ROOT}.new", "by the new owner")
            before = but_our_renewals(snapshot(pg_url))
            child.signal(signal.SIGCONT)
            assert child.finish() == 3, child.describe()
            assert but_our_renewals(snapshot(pg_url)) == before
        assert child.events[-1]["type"] == "FencedError", child.describe()
        assert new.get(f"{ROOT}.new").value == "by the new owner"


def but_our_renewals(rows: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """A snapshot less the leases' expiry, which the new owner's own heartbeat moves on."""
    return {**rows, "leases": [row[:-1] for row in rows["leases"]]}


def test_a_writing_owner_stopped_past_its_lease_with_no_one_else_writes_nothing(pg_url: str) -> None:
    with children() as start:
        child = start(CHILD, pg_url, ROOT, 1, "write")
        child.wait_for(lambda e: e.get("n") == 5)
        child.signal(signal.SIGSTOP)
        wait_until(lambda: lease(pg_url, ROOT)[2] < -0.2)
        before = snapshot(pg_url)
        child.signal(signal.SIGCONT)
        assert child.finish() == 3, child.describe()
        assert child.events[-1]["type"] == "FencedError", child.describe()
        assert snapshot(pg_url) == before
    with pg(pg_url, lease_s=1, lock_timeout=0.5) as new, new.own(ROOT):  # free for the next, at once
        assert lease(pg_url, ROOT)[1] == 2


# -- two owners contending for one root -------------------------------------------------------


def test_a_second_owner_waits_then_is_told_who_holds_the_workflow(pg_url: str) -> None:
    with pg(pg_url, lease_s=2) as first, pg(pg_url, lock_timeout=0.5) as second, first.own(ROOT):
        holder = lease(pg_url, ROOT)[0]
        began = time.monotonic()
        with pytest.raises(WorkflowBusyError) as busy, second.own(ROOT):
            pytest.fail("a second owner got the lease")
        waited = time.monotonic() - began
        assert busy.value.root_id == ROOT
        assert busy.value.owner.startswith(holder)
        assert holder in str(busy.value)
        assert 0.5 <= waited < 3, waited
        time.sleep(2.5)  # more than a lease: the heartbeat keeps it
        with pytest.raises(WorkflowBusyError), second.own(ROOT):
            pytest.fail("a second owner got a lease that was renewed")
    assert lease(pg_url, ROOT)[1] == 1


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(pg_url: str) -> None:
    with children() as start, pg(pg_url, lock_timeout=10) as new:
        child = start(CHILD, pg_url, ROOT, 30, "hold")
        child.wait_for("owned")
        waiting: dict[str, float] = {}

        def take() -> None:
            with new.own(ROOT):
                waiting["took"] = time.monotonic()

        taker = threading.Thread(target=take)
        taker.start()
        time.sleep(0.5)  # it waits meanwhile
        assert "took" not in waiting
        killed = time.monotonic()
        child.signal(signal.SIGKILL)  # not reaped: a zombie until the test ends
        taker.join(timeout=15)
        assert waiting["took"] - killed < 2, "the dead holder's lease of 30 s was waited for"
        assert lease(pg_url, ROOT)[1] == 2


def test_a_stopped_holder_is_taken_over_only_once_its_lease_expired(pg_url: str) -> None:
    with children() as start, pg(pg_url, lock_timeout=0.3) as impatient, \
            pg(pg_url, lock_timeout=10) as patient:
        child = start(CHILD, pg_url, ROOT, 1.5, "hold")
        child.wait_for("owned")
        child.signal(signal.SIGSTOP)
        time.sleep(0.1)
        measured = time.monotonic()
        left = lease(pg_url, ROOT)[2]
        assert left > 0.5, "the lease expired before the test could look"
        with pytest.raises(WorkflowBusyError, match="its lease ends in"), impatient.own(ROOT):
            pytest.fail("a stopped holder's unexpired lease was taken")
        with patient.own(ROOT):
            took = time.monotonic() - measured
        assert took >= left, f"taken after {took:.2f} s, before its lease ended ({left:.2f} s)"
        assert lease(pg_url, ROOT)[1] == 2


# -- a database that goes away, or is not ours ------------------------------------------------


def terminate_other_sessions(url: str) -> int:
    return len(query(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()"))


CALLS: dict[str, Callable[[PgStore], Any]] = {
    "get": lambda s: s.get("a"),
    "create": lambda s: s.create("b", None),
    "start_attempt": lambda s: s.start_attempt("a"),
    "resolve": lambda s: s.resolve("a", 1),
    "list": lambda s: s.list("a"),
    "sync": lambda s: s.sync(),
    "claim": lambda s: s.claim(["a"], "me", 1.0),
}


def test_the_call_after_the_database_dropped_the_sessions_is_a_store_error(pg_url: str) -> None:
    for call in sorted(CALLS):
        with pg(pg_url) as store:
            store.create("a", None)
            store.sync()
            assert terminate_other_sessions(pg_url) >= 2  # both pools' connections
            with pytest.raises(StoreError) as failed:
                CALLS[call](store)
            assert not isinstance(failed.value, psycopg.Error), call
            assert "durable_t_" in str(failed.value), call  # names the database
    with pg(pg_url) as again:
        assert again.get("a").state is State.PENDING
        again.start_attempt("a")
        assert again.resolve("a", 1).value == 1


def test_an_owner_whose_sessions_were_dropped_fails_with_a_store_error_and_a_new_one_takes_over(
    pg_url: str,
) -> None:
    with pg(pg_url, lease_s=1) as store:
        with pytest.raises(StoreError) as failed, store.own(ROOT):
            store.create(ROOT, None)
            store.start_attempt(ROOT)
            terminate_other_sessions(pg_url)
            store.resolve(ROOT, "done")
        assert not isinstance(failed.value, psycopg.Error)
    with pg(pg_url, lease_s=1, lock_timeout=5) as new, new.own(ROOT):
        assert new.get(ROOT).state is State.PENDING
        assert new.resolve(ROOT, "done").value == "done"


def test_tables_of_a_newer_release_are_refused_untouched(pg_url: str) -> None:
    pg(pg_url).close()
    query(pg_url, "UPDATE durable_schema SET version = 99 WHERE component = 'store'")
    with pytest.raises(StoreError, match="version 99, made by a newer release") as refused:
        pg(pg_url)
    assert "upgrade" in str(refused.value)
    assert query(pg_url, "SELECT version FROM durable_schema WHERE component = 'store'") == [(99,)]


def test_a_database_that_does_not_answer_is_a_store_error_naming_it() -> None:
    url = "postgresql://postgres@127.0.0.1:1/nowhere"  # nothing listens on port 1
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL") as failed:
        pg(url, connect_timeout=1)
    assert "127.0.0.1:1/nowhere" in str(failed.value)


# -- ids and values an outsider would try -----------------------------------------------------

HOSTILE_IDS = [
    "a", "a%", "a%b", "a_b", "ab", "a.b", "a'b", 'a"b', "a\\b", "a\\", "a'); DROP TABLE promises; --",
    "A", "a ", " a", "a\t", "a\x7f", "a\x01", "é", "e\u0301", "日本", "日本語", "😀", "😀x", "a\uffff",
    "%", "_", "%%", "\\%", "*", "[a]", "a" * 2000,
]
PREFIXES = [
    "", "a", "a%", "a_", "a\\", "%", "_", "\\", "'", "e", "é", "日本", "😀", "a\uffff", "A", "a" * 1000,
]


def test_hostile_ids_are_kept_and_listed_by_prefix_as_the_in_memory_store_does(pg_url: str) -> None:
    with pg(pg_url) as store, MemoryStore() as model:
        for i, promise_id in enumerate(HOSTILE_IDS):
            for s in (store, model):
                s.create(promise_id, {"i": i})
                s.start_attempt(promise_id)
                s.resolve(promise_id, promise_id)
        for promise_id in HOSTILE_IDS:
            assert store.get(promise_id).value == promise_id
        for prefix in PREFIXES:
            assert [p.id for p in store.list(prefix)] == [p.id for p in model.list(prefix)], prefix
    assert sorted(r[0] for r in query(pg_url, "SELECT id FROM promises")) == sorted(HOSTILE_IDS)


def test_list_finds_ids_that_continue_with_the_last_character(pg_url: str) -> None:
    ids = ["x", "x\U0010ffff", "x\U0010ffffz", "xy"]
    with pg(pg_url) as store:
        for promise_id in ids:
            store.create(promise_id, None)
        assert [p.id for p in store.list("x")] == ids


@pytest.mark.parametrize("bad", ["x\x00y", "x\ud800"], ids=["nul", "surrogate"])
def test_an_id_postgresql_cannot_hold_is_refused_at_once_and_harms_nothing(pg_url: str, bad: str) -> None:
    with pg(pg_url, lease_s=30) as store, store.own(ROOT):
        with pytest.raises(TypeError, match="id"):
            store.create(f"{ROOT}.{bad}", None)
        store.create(f"{ROOT}.0", None)
        assert store.start_attempt(f"{ROOT}.0") == 1


VALUES = [
    0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, 0.5, 1e16, 1e-7, 1.5e300, 5e-324, 1.7976931348623157e308,
    123456789012345678.0, 0.1 + 0.2, True, False, None, "", "1e5", "-1E-5", 'q"1e5', "\\1e5\\",
    "😀 é \u2028 \u0001", "\\u0000", {"1e5": 1e5, "": None, "b": [1, 1.0, True]},
    {"z": 1, "a": 2, "aa": 3}, [[[[[]]]]], list(range(50)), {"k": "v" * 10_000},
]


@pytest.mark.parametrize("owned", [False, True], ids=["unowned", "owned"])
def test_values_come_back_exactly_as_normalized(pg_url: str, owned: bool) -> None:
    root = "vals"
    with pg(pg_url) as store, store.own(root) if owned else contextlib.nullcontext():
        for i, value in enumerate(VALUES):
            store.create(f"{root}.{i}", {"v": value})
            store.start_attempt(f"{root}.{i}")
            store.resolve(f"{root}.{i}", value)
    with pg(pg_url) as reader:
        for i, value in enumerate(VALUES):
            promise = reader.get(f"{root}.{i}")
            assert same_json(promise.value, normalize(value)), (value, promise.value)
            assert same_json(promise.param, {"v": normalize(value)})
            assert exact(promise.value) == exact(normalize(value))
            # created again with the same param: the same promise, not a conflict
            assert reader.create(f"{root}.{i}", {"v": value}).value == promise.value


def exact(value: Any) -> Any:
    """A value with every number tagged by its type (and a float by its bits)."""
    if isinstance(value, dict):
        return {k: exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [exact(v) for v in value]
    if isinstance(value, float):
        return ("float", value.hex())
    return (type(value).__name__, value)


def test_negative_zero_is_the_same_json_again(pg_url: str) -> None:
    """jsonb's numbers have no negative zero: every backend keeps -0.0 as 0.0 (store/codec.py)."""
    with pg(pg_url) as store:
        store.create("z", {"x": -0.0})
        store.create("z", {"x": -0.0})  # idempotent, as in every other backend
        store.start_attempt("z")
        store.resolve("z", -0.0)
        store.resolve("z", -0.0)
        assert math.copysign(1, store.get("z").value) == 1


# -- many threads on one store ------------------------------------------------------------------


def test_many_threads_owning_and_writing_through_one_store(pg_url: str) -> None:
    threads, steps = 12, 15
    errors: list[BaseException] = []

    def drive(t: int) -> None:
        root = f"t{t}"
        try:
            with store.own(root):
                store.create(root, {"t": t})
                for n in range(steps):
                    step = f"{root}.{n}"
                    store.create(step, {"n": n})
                    store.start_attempt(step)
                    store.resolve(step, [t, n])
                    assert store.get(step).value == [t, n]
                store.resolve(root, t)
            loose = f"loose{t}"
            store.create(loose, None)
            store.start_attempt(loose)
            store.reject(loose, {"type": "E", "message": str(t)})
        except BaseException as exc:
            errors.append(exc)

    with pg(pg_url, pool_size=4, lease_s=2) as store:
        workers = [threading.Thread(target=drive, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert errors == []
    with pg(pg_url) as reader:
        everything = reader.list()
        assert len(everything) == threads * (steps + 2)
        for t in range(threads):
            steps_of = reader.list(f"t{t}.")
            assert [p.id for p in steps_of] == [f"t{t}.{n}" for n in range(steps)]  # creation order
            assert all(p.value == [t, n] and p.attempts == 1 for n, p in enumerate(steps_of))
            assert reader.get(f"t{t}").value == t
            assert reader.get(f"loose{t}").state is State.REJECTED
    assert query(pg_url, "SELECT count(*) FROM leases WHERE expires_at > now()") == [(0,)]  # released


def test_threads_owning_other_roots_meanwhile_do_not_break_an_owner(pg_url: str) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()

    def owner(i: int) -> None:
        with store.own(f"r{i}"):
            store.create(f"r{i}", None)
            while not stop.is_set():
                try:
                    store.get(f"r{i}")  # the owner's view: under which owned root is it?
                except BaseException as exc:
                    errors.append(exc)
                    stop.set()

    def churn(j: int) -> None:
        k = 0
        try:
            while not stop.is_set():
                with store.own(f"c{j}-{k}"):
                    k += 1
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often: the race shows within a second
    try:
        with pg(pg_url, lease_s=5) as store:
            threads = [threading.Thread(target=owner, args=(i,)) for i in range(3)]
            threads += [threading.Thread(target=churn, args=(j,)) for j in range(2)]
            for t in threads:
                t.start()
            stop.wait(3)
            stop.set()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(switching)
    assert errors == []


def test_an_unowned_store_cannot_enqueue(pg_url: str) -> None:
    with pg(pg_url) as store:
        store.create(f"{ROOT}.0", None)
        with pytest.raises(StoreError, match="under its workflow's lease"):
            store.enqueue(f"{ROOT}.0", {"max_attempts": 1})
    assert query(pg_url, "SELECT count(*) FROM tasks") == [(0,)]

