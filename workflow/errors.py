"""Errors of the workflow runtime.

`StepError` is the one error a workflow sees at its `yield`: a step (or sub-workflow) that was
rejected, now or in an earlier run. The `EngineError`s never settle a promise: they mean the code
or the store is not what the recorded history expects, or the run was asked to stop.
`PermanentError` is for applications: the base of their errors that no retry can fix.
"""

from __future__ import annotations

from typing import Any


def failure_record(exc: BaseException, attempts: int = 0) -> dict[str, Any]:
    """How a step's failure is kept as its promise's error: its type and message (a NUL in the
    message, from the data a step read, escaped: no store can keep one), and the attempts it
    used, if any."""
    error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc).replace("\x00", "\\x00")}
    if attempts:
        error["attempts"] = attempts
    return error


def cancellation_record() -> dict[str, Any]:
    """How a cancelled workflow is kept: its root rejected with this error, which `retry` reopens
    like any rejection, and which `is_cancellation` tells apart from a failure."""
    return {"type": WorkflowCancelled.__name__, "message": "cancelled on request", "cancelled": True}


def is_cancellation(error: Any) -> bool:
    """Whether a rejected promise's error says that it was cancelled, not that it failed."""
    return (isinstance(error, dict) and error.get("type") == WorkflowCancelled.__name__
            and error.get("cancelled") is True)


class StepError(Exception):
    """A durable call that ended rejected; the same error is raised on every replay."""

    def __init__(self, promise_id: str, fn: str, error: dict[str, Any]) -> None:
        self.promise_id = promise_id
        self.fn = fn
        self.error = error
        attempts = error.get("attempts")
        tries = f" after {attempts} attempt{'s' * (attempts != 1)}" if attempts else ""
        super().__init__(
            f"step '{fn}' ({promise_id}) failed{tries}: {error.get('type')}: {error.get('message')}"
        )


class PermanentError(Exception):
    """An application's error that no retry can fix (bad input, a full disk): subclass it.

    A step that raises one is rejected at once, whatever its retry policy allows; raised by a
    child's setup hook, it ends the child with exit status FATAL, so no supervisor restarts it.
    """


class EngineError(Exception):
    """Raised by the runtime itself; never stored as a workflow's outcome."""


class NonDeterminismError(EngineError):
    """On replay, the call at a position is not the one recorded there."""

    HOW_TO_CHANGE = (
        "If the change is deliberate, put it behind `if (yield ctx.patched('<name>')):` (the old "
        "code in the else branch), or register the changed workflow as a new version beside the "
        "old one (README: Changing code under running imports)"
    )

    def __init__(self, promise_id: str, expected: str, actual: str, hint: str = HOW_TO_CHANGE) -> None:
        super().__init__(
            f"non-deterministic workflow: call {promise_id} was recorded as {expected}, "
            f"but the code now calls {actual}. {hint}"
        )
        self.promise_id = promise_id
        self.expected = expected
        self.actual = actual


class VersionNotRegisteredError(EngineError):
    """A run was recorded with a workflow version that this code does not register."""

    def __init__(self, promise_id: str, name: str, version: Any, registered: list[int]) -> None:
        have = ", ".join(f"v{v}" for v in registered) or "none"
        super().__init__(
            f"workflow {promise_id} was recorded with {name} v{version}, which this code does not "
            f"register (it has {have}): keep v{version} registered beside the new version "
            f"(@register(name={name!r}, version={version})) until its runs are done, or start "
            "the work again under a new id"
        )
        self.promise_id = promise_id
        self.version = version


class WorkflowUsageError(EngineError, TypeError):
    """The code uses the engine wrongly (a root that is no workflow, arguments it does not take,
    a yield of something that is not a durable call, a function without a stable name): no
    retry or restart can help, and nothing is settled."""


class CallNotYieldedError(EngineError):
    """A workflow made a durable call and never yielded it, so it never ran."""

    def __init__(self, call: Any) -> None:
        name = getattr(call.fn, "__qualname__", repr(call.fn))
        super().__init__(
            f"the durable call {call.promise_id} ({name}) was made but never yielded, so it never "
            f"ran: write `result = yield ctx.run({name}, ...)`"
        )
        self.promise_id = call.promise_id


class WorkflowConflictError(EngineError):
    """A root id already holds a workflow with another function, version or arguments."""

    def __init__(self, root_id: str, stored: Any, requested: Any) -> None:
        super().__init__(
            f"workflow {root_id} already exists with {_describe(stored)}; "
            f"refusing to run it with {_describe(requested)} (use another id)"
        )
        self.root_id = root_id
        self.stored = stored
        self.requested = requested


class WorkflowInterrupted(EngineError):
    """The run was asked to stop between two steps; the next run resumes where this one stopped."""


class WorkflowCancelled(EngineError):
    """The workflow was cancelled (an operator's request, seen between two steps): its root is
    rejected with `cancellation_record()`; a retry reopens it, and its steps done stay done."""

    def __init__(self, root_id: str) -> None:
        super().__init__(f"workflow {root_id} is cancelled; retry it to resume it")
        self.root_id = root_id


def _describe(param: Any) -> str:
    if isinstance(param, dict) and "fn" in param:
        kwargs = param.get("kwargs", {})
        return f"{param['fn']} v{param.get('v')} args={param.get('args')} kwargs={kwargs}"
    return repr(param)
