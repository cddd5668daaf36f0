"""The durable runtime: workflows are generators replayed over a promise store."""

from .child import RunInfo
from .context import Call, Context, StepInfo, current_step
from .deadline import StepTimeoutError
from .errors import (
    CallNotYieldedError,
    EngineError,
    NonDeterminismError,
    PermanentError,
    StepError,
    VersionNotRegisteredError,
    WorkflowCancelled,
    WorkflowConflictError,
    WorkflowInterrupted,
    WorkflowUsageError,
)
from .registry import describe, lookup, register, registered, versions
from .retry import RetryPolicy
from .runner import AttemptsExhaustedError, ObserverError, Runner, StepEvent, run

__all__ = [
    "AttemptsExhaustedError",
    "Call",
    "CallNotYieldedError",
    "Context",
    "EngineError",
    "NonDeterminismError",
    "ObserverError",
    "PermanentError",
    "RetryPolicy",
    "RunInfo",
    "Runner",
    "StepError",
    "StepEvent",
    "StepInfo",
    "StepTimeoutError",
    "VersionNotRegisteredError",
    "WorkflowCancelled",
    "WorkflowConflictError",
    "WorkflowInterrupted",
    "WorkflowUsageError",
    "current_step",
    "describe",
    "lookup",
    "register",
    "registered",
    "run",
    "versions",
]
