"""Patches: ship a change to a workflow's code while runs recorded with the old code are in flight.

    if (yield ctx.patched("strict-email")):
        ...the new code...
    else:
        ...the old code...

The first time a run reaches a patch at the end of its recorded history, the runner records a
marker (a resolved promise, `ids.patch_marker_id`, holding the call position it was reached
at) and the new branch is taken, then and at every later pass. A run that went past that point
with the old code (its history records a call there, but no marker) takes the old branch, so
its recorded calls still match. Markers take no call position: call ids stay `<id>.<n>`.

When no run recorded before the patch is left, `yield ctx.deprecate_patch(name)` (or nothing)
replaces the `if`, keeping only the new branch; a run that would still need the old one is
refused with NonDeterminismError instead of being mixed with the new code.
"""

from __future__ import annotations

from typing import NamedTuple

from .errors import WorkflowUsageError


class PatchNotYieldedError(WorkflowUsageError):
    """`if ctx.patched(...)` without `yield`: it would always take the new branch, silently."""


class Patch(NamedTuple):
    """What `ctx.patched(...)` and `ctx.deprecate_patch(...)` make: yield it."""

    name: str
    deprecated: bool

    def __bool__(self) -> bool:
        raise PatchNotYieldedError(
            f"ctx.patched({self.name!r}) must be yielded: write `if (yield ctx.patched({self.name!r})):`"
        )
