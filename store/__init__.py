"""Durable promises: the only layer of the engine that touches the disk."""

from .base import PromiseStore
from .codec import normalize, same_json
from .errors import (
    PromiseConflictError,
    PromiseNotFoundError,
    StoreCorruptedError,
    StoreError,
    StoreLockedError,
    StoreWriteError,
    WorkflowBusyError,
)
from .jsonl import Durability, JsonlStore
from .promise import Promise, State

__all__ = [
    "Durability",
    "JsonlStore",
    "Promise",
    "PromiseConflictError",
    "PromiseNotFoundError",
    "PromiseStore",
    "State",
    "StoreCorruptedError",
    "StoreError",
    "StoreLockedError",
    "StoreWriteError",
    "WorkflowBusyError",
    "normalize",
    "same_json",
]
