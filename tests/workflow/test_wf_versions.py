"""Changing code under runs in flight: patches, workflow versions side by side, and the errors
that say what to do when a change is neither. The old code is the history it left in the store."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from store import MemoryStore, State
from workflow import (
    Context,
    NonDeterminismError,
    Runner,
    VersionNotRegisteredError,
    current_step,
    register,
)

ROOT = "deploy"


@register(name="v.old_step")
def old_step(i: int) -> str:
    current_step().dependency("ran").append(("old", i))
    return f"old {i}"


@register(name="v.new_step")
def new_step(i: int) -> str:
    current_step().dependency("ran").append(("new", i))
    return f"new {i}"


def recorded(workflow: str, version: int = 1, *, old_done: int, old_in_flight: bool,
             marker_at: int | None = None, step: str = "v.old_step") -> MemoryStore:
    """The store a run of the old code of `workflow` (4 steps) left when its worker died."""
    store = MemoryStore()
    store.create(ROOT, {"fn": workflow, "v": version, "args": [4]})
    if marker_at is not None:
        store.create(f"{ROOT}.patch:new-step", {"patch": "new-step", "at": marker_at})
        store.resolve(f"{ROOT}.patch:new-step", True)
    for i in range(old_done + old_in_flight):
        store.create(f"{ROOT}.{i}", {"fn": step, "v": 1, "args": [i]})
        store.start_attempt(f"{ROOT}.{i}")
        if i < old_done:
            store.resolve(f"{ROOT}.{i}", f"{step.removeprefix('v.').split('_')[0]} {i}")
    return store


def run(store: MemoryStore, workflow: Any) -> tuple[Any, list[tuple[str, int]]]:
    ran: list[tuple[str, int]] = []
    return Runner(store, dependencies={"ran": ran}).run(ROOT, workflow, 4), ran


# -- patches ------------------------------------------------------------------------------------


@register(name="v.patched")
def patched_loop(ctx: Context, n: int) -> Generator[Any, Any, list[str]]:
    results = []
    for i in range(n):
        if (yield ctx.patched("new-step")):
            results.append((yield ctx.run(new_step, i)))
        else:
            results.append((yield ctx.run(old_step, i)))
    return results


def test_a_half_done_run_keeps_its_old_steps_and_takes_the_patch_from_where_it_stands() -> None:
    store = recorded("v.patched", old_done=2, old_in_flight=True)  # .2 was in flight, old code

    result, ran = run(store, patched_loop)

    assert result == ["old 0", "old 1", "old 2", "new 3"]
    assert ran == [("old", 2), ("new", 3)]  # done steps replayed; the one in flight stays old
    marker = store.get(f"{ROOT}.patch:new-step")
    assert marker.state is State.RESOLVED and marker.param == {"patch": "new-step", "at": 3}
    assert [p.id for p in store.list(f"{ROOT}.") if p.id[-1].isdigit()] == [f"{ROOT}.{i}" for i in range(4)]


def test_a_run_with_the_marker_replays_the_same_branches() -> None:
    store = recorded("v.patched", old_done=2, old_in_flight=False)
    first, _ = run(store, patched_loop)
    ran: list[tuple[str, int]] = []
    # A fresh runner on the same history (the root is settled: the stored result comes back).
    assert Runner(store, dependencies={"ran": ran}).run(ROOT, patched_loop, 4) == first == [
        "old 0", "old 1", "new 2", "new 3"]
    assert ran == []


def test_a_new_run_takes_the_new_branch_everywhere() -> None:
    store = MemoryStore()
    result, ran = run(store, patched_loop)
    assert result == [f"new {i}" for i in range(4)] and ran == [("new", i) for i in range(4)]
    assert store.get(f"{ROOT}.patch:new-step").param["at"] == 0


def test_patched_without_yield_is_a_type_error_saying_how() -> None:
    @register(name="v.forgot_yield")
    def forgot_yield(ctx: Context, n: int) -> Generator[Any, Any, str]:
        if ctx.patched("new-step"):
            return (yield ctx.run(new_step, 0))
        return (yield ctx.run(old_step, 0))

    store = MemoryStore()
    with pytest.raises(TypeError, match=r"must be yielded: write `if \(yield ctx.patched\('new-step'\)\):`"):
        run(store, forgot_yield)
    assert store.get(ROOT).state is State.PENDING  # a bug in the code, not a failed run


@register(name="v.deprecated")
def deprecated_loop(ctx: Context, n: int) -> Generator[Any, Any, list[str]]:
    results = []
    for i in range(n):
        yield ctx.deprecate_patch("new-step")
        results.append((yield ctx.run(new_step, i)))
    return results


def test_deprecate_patch_lets_runs_recorded_with_the_marker_finish() -> None:
    store = recorded("v.deprecated", old_done=2, old_in_flight=False, marker_at=0, step="v.new_step")
    result, ran = run(store, deprecated_loop)
    assert result == [f"new {i}" for i in range(4)] and ran == [("new", 2), ("new", 3)]


def test_deprecate_patch_refuses_a_run_that_still_needs_the_old_branch() -> None:
    store = recorded("v.deprecated", old_done=2, old_in_flight=False)
    with pytest.raises(NonDeterminismError) as refused:
        run(store, deprecated_loop)
    message = str(refused.value)
    assert "still in flight: restore `if (yield ctx.patched('new-step')):` and its old branch" in message
    assert "put it behind" not in message  # no advice that contradicts it


# -- a change that is not behind a patch --------------------------------------------------------


@register(name="v.unpatched")
def unpatched_loop(ctx: Context, n: int) -> Generator[Any, Any, list[str]]:
    results = []
    for i in range(n):
        results.append((yield ctx.run(new_step, i)))
    return results


def test_an_unpatched_change_is_refused_with_how_to_patch_it() -> None:
    store = recorded("v.unpatched", old_done=2, old_in_flight=False)
    with pytest.raises(NonDeterminismError) as refused:
        run(store, unpatched_loop)
    message = str(refused.value)
    assert f"call {ROOT}.0 was recorded as v.old_step v1, but the code now calls v.new_step v1" in message
    assert "ctx.patched('<name>')" in message and "new version" in message
    assert store.get(ROOT).state is State.PENDING  # not failed: deploy a fix and run again


# -- versions side by side ----------------------------------------------------------------------


@register(name="v.versioned", version=1)
def versioned_v1(ctx: Context, n: int) -> Generator[Any, Any, list[str]]:
    results = []
    for i in range(n):
        results.append((yield ctx.run(old_step, i)))
    return results


@register(name="v.versioned", version=2)
def versioned_v2(ctx: Context, n: int) -> Generator[Any, Any, list[str]]:
    results = []
    for i in range(n):
        results.append((yield ctx.run(new_step, i)))
    return results


def test_a_run_recorded_with_v1_finishes_on_v1_and_new_runs_use_v2() -> None:
    store = recorded("v.versioned", old_done=2, old_in_flight=False)

    result, ran = run(store, versioned_v2)  # the deployed entry point is v2

    assert result == [f"old {i}" for i in range(4)] and ran == [("old", 2), ("old", 3)]
    fresh, _ = run(MemoryStore(), versioned_v2)
    assert fresh == [f"new {i}" for i in range(4)]


def test_a_run_of_a_version_no_longer_registered_is_refused_saying_what_to_do() -> None:
    store = recorded("v.versioned", version=7, old_done=1, old_in_flight=False)
    with pytest.raises(VersionNotRegisteredError, match=(
        r"workflow deploy was recorded with v.versioned v7, which this code does not register "
        r"\(it has v1, v2\): keep v7 registered")):
        run(store, versioned_v2)
    assert store.get(ROOT).state is State.PENDING
