"""Forking a workflow: a new root that reuses the results of another's first steps (as DBOS's
`fork_workflow` does), so that a run of it replays them and runs the steps from there again.

The fork's root records the same call as the original's (function, version, arguments), so the
same code drives it; what is copied, each as a resolved promise under the new id, is every
resolved direct step before `before_step` and every resolved call under those, and the patch
markers recorded before that step. Nothing pending or rejected is copied: the fork runs it.
The fork's root is created last, and only then is the store synced: until then a crash leaves
no fork (its copies are made again, idempotently, by the next try), after it a whole one.
"""

from __future__ import annotations

from store import Promise, PromiseConflictError, PromiseNotFoundError, PromiseStore, State

from .ids import check_root_id, children_prefix, moved, patch_marker_name, top_step


def fork(store: PromiseStore, root_id: str, new_id: str, before_step: int | None) -> list[str]:
    """Make `new_id` a fork of the workflow `root_id` that reuses its steps before `before_step`
    (all of its resolved steps for None); return the ids copied (the new ones), in order.

    Refused: an unknown `root_id` (PromiseNotFoundError), an existing `new_id`
    (PromiseConflictError). Both workflows are owned meanwhile: neither may be running.
    """
    check_root_id(new_id)
    _check_forkable(store, root_id, new_id)
    with store.own(root_id), store.own(new_id):
        root = _check_forkable(store, root_id, new_id)  # again, now that no one else can make it
        copied = []
        for promise in store.list(children_prefix(root_id)):
            if promise.state is State.RESOLVED and _before(root_id, promise, before_step):
                copy = moved(promise.id, root_id, new_id)
                store.create(copy, promise.param)
                store.resolve(copy, promise.value, defer_sync=True)
                copied.append(copy)
        store.create(new_id, root.param)  # last: the fork exists from here on
        store.sync()
    return copied


def _check_forkable(store: PromiseStore, root_id: str, new_id: str) -> Promise:
    """The root to fork; refused if there is none, or if `new_id` exists."""
    root = store.get(root_id)
    if root is None:
        raise PromiseNotFoundError(root_id)
    if new_id == root_id or store.get(new_id) is not None:
        raise PromiseConflictError(new_id, "exists already; give the fork another id")
    return root


def _before(root_id: str, promise: Promise, before_step: int | None) -> bool:
    """Whether `promise` (under `root_id`) belongs to the part of the history a fork reuses."""
    if before_step is None:
        return True
    n = top_step(root_id, promise.id)
    if n is not None:
        return n < before_step
    if patch_marker_name(root_id, promise.id) is not None:  # recorded where the patch was met
        return promise.param.get("at", before_step) < before_step
    return False
