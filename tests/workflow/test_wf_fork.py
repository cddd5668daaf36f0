"""workflow.fork in-process: the fork replays the copied steps and runs the rest; a fork cut
short (its root not yet made) is made again whole; refusals."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from store import PromiseConflictError, PromiseNotFoundError, PromiseStore, State
from workflow import Context, Runner, current_step, register
from workflow.fork import fork

ROOT, NEW = "wf/orig", "wf/orig~fork-2"


@register(name="tf.step")
def step(i: int) -> int:
    current_step().dependency("ran").append((current_step().parent_id, i))
    return i * i


@register(name="tf.steps")
def steps(ctx: Context, n: int) -> Generator[Any, Any, list[int]]:
    values = []
    for i in range(n):
        if i == 1:
            yield ctx.patched("p")  # a marker at call position 1, before the cut
        values.append((yield ctx.run(step, i)))
    return values


def test_a_fork_replays_the_steps_before_the_cut_and_runs_the_rest(store: PromiseStore) -> None:
    ran: list[tuple[str, int]] = []
    runner = Runner(store, dependencies={"ran": ran})
    assert runner.run(ROOT, steps, 4) == [0, 1, 4, 9]
    copied = fork(store, ROOT, NEW, 2)
    assert copied == [f"{NEW}.0", f"{NEW}.patch:p", f"{NEW}.1"]
    assert store.get(NEW).state is State.PENDING and store.get(NEW).param == store.get(ROOT).param
    assert runner.run(NEW, steps, 4) == [0, 1, 4, 9]
    assert [i for who, i in ran if who == NEW] == [2, 3]  # 0 and 1 were replayed


def test_a_fork_cut_short_before_its_root_is_made_again(store: PromiseStore) -> None:
    Runner(store, dependencies={"ran": []}).run(ROOT, steps, 3)
    store.create(f"{NEW}.0", store.get(f"{ROOT}.0").param)  # a crash left one copy, no root
    store.resolve(f"{NEW}.0", 0)
    assert fork(store, ROOT, NEW, None) == [f"{NEW}.0", f"{NEW}.patch:p", f"{NEW}.1", f"{NEW}.2"]


def test_fork_refuses_an_unknown_workflow_and_an_existing_new_id(store: PromiseStore) -> None:
    with pytest.raises(PromiseNotFoundError):
        fork(store, "wf/none", NEW, 1)
    Runner(store, dependencies={"ran": []}).run(ROOT, steps, 2)
    with pytest.raises(PromiseConflictError, match="exists already"):
        fork(store, ROOT, ROOT, 1)
    with pytest.raises(ValueError, match=r"has no '\.'"):
        fork(store, ROOT, "wf.x", 1)
