"""Random sequences of calls against every store backend and a plain model of the rules."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_helpers import records

from store import (
    Durability,
    JsonlStore,
    MemoryStore,
    PromiseConflictError,
    PromiseNotFoundError,
    State,
)


@dataclass
class Model:
    """What one promise must look like after the calls so far."""

    param: Any
    state: State = State.PENDING
    outcome: Any = None
    attempts: int = 0
    attempts_at_reopen: int = 0


ids = st.sampled_from(["a", "b", "c"])
outcomes = st.sampled_from([0, 1, "x", [1, 2], {"k": None}])  # no bools: True == 1 is a bug
calls = st.one_of(
    st.tuples(st.just("create"), ids, st.sampled_from([0, 1])),
    st.tuples(st.just("start_attempt"), ids),
    st.tuples(st.just("resolve"), ids, outcomes),
    st.tuples(st.just("reject"), ids, st.sampled_from([{"type": "E"}, {"type": "F"}])),
    st.tuples(st.just("reopen"), ids, st.just("retry")),
    st.tuples(st.just("compact")),
    st.tuples(st.just("reopen_store")),
)


def expected_error(models: dict[str, Model], call: tuple) -> type[Exception] | None:
    """The error the rules demand for `call`, updating `models` when it succeeds."""
    name, *args = call
    if name in ("compact", "reopen_store"):
        return None
    pid = args[0]
    model = models.get(pid)
    if name == "create":
        if model is None:
            models[pid] = Model(args[1])
            return None
        return None if model.param == args[1] else PromiseConflictError
    if model is None:
        return PromiseNotFoundError
    if name == "start_attempt":
        if model.state is not State.PENDING:
            return PromiseConflictError
        model.attempts += 1
    elif name in ("resolve", "reject"):
        state = State.RESOLVED if name == "resolve" else State.REJECTED
        if model.state is State.PENDING:
            model.state, model.outcome = state, args[1]
        elif (model.state, model.outcome) != (state, args[1]):
            return PromiseConflictError
    elif name == "reopen":
        if model.state is not State.REJECTED:
            return PromiseConflictError
        model.state, model.outcome, model.attempts_at_reopen = State.PENDING, None, model.attempts
    return None


BACKENDS = {  # backend -> how to open (again) the store at a path
    "jsonl-shared": lambda path: JsonlStore(path, durability=Durability.NONE),
    "jsonl-exclusive": lambda path: JsonlStore(path, durability=Durability.NONE, exclusive=True),
    "memory": None,  # one MemoryStore for the whole script: "reopen_store" keeps it
}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # one new dir per example
@given(st.lists(calls, max_size=25))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_store_follows_the_rules_and_reads_back_what_it_wrote(
    tmp_path: Path, backend: str, script: list[tuple]
) -> None:
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "promises.jsonl"
    reopen = BACKENDS[backend]
    models: dict[str, Model] = {}
    store = MemoryStore() if reopen is None else reopen(path)
    try:
        for call in script:
            error = expected_error(models, call)
            if call[0] == "reopen_store":
                if reopen is not None:
                    store.close()
                    store = reopen(path)
                continue
            try:
                getattr(store, call[0])(*call[1:])
            except (PromiseConflictError, PromiseNotFoundError) as exc:
                assert type(exc) is error, f"{call}: {exc!r}"
            else:
                assert error is None, f"{call} should raise {error.__name__}"
        final = store.list()
    finally:
        store.close()
    if reopen is not None:
        records(path)  # every line is JSON with a valid checksum
        with JsonlStore(path, readonly=True) as again:
            assert again.list() == final
    assert [p.id for p in final] == list(models)
    for promise in final:
        model = models[promise.id]
        outcome = promise.value if promise.state is State.RESOLVED else promise.error
        assert (promise.param, promise.state, outcome, promise.attempts,
                promise.attempts_at_reopen) == (model.param, model.state, model.outcome,
                                                model.attempts, model.attempts_at_reopen)
