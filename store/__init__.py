"""Durable promises: the only layer of the engine that touches the disk."""

from .backends import open_store, parse_store_url
from .base import PromiseStore
from .codec import normalize, same_json
from .errors import (
    PromiseConflictError,
    PromiseNotFoundError,
    StoreCorruptedError,
    StoreError,
    StoreLockedError,
    StoreUnavailableError,
    StoreWriteError,
    UnstorableValueError,
    WorkflowBusyError,
)
from .indexed import storable
from .jsonl import Durability, JsonlStore
from .memory import MemoryStore
from .promise import Promise, State

__all__ = [
    "Durability",
    "JsonlStore",
    "MemoryStore",
    "Promise",
    "PromiseConflictError",
    "PromiseNotFoundError",
    "PromiseStore",
    "State",
    "StoreCorruptedError",
    "StoreError",
    "StoreLockedError",
    "StoreUnavailableError",
    "StoreWriteError",
    "UnstorableValueError",
    "WorkflowBusyError",
    "normalize",
    "open_store",
    "parse_store_url",
    "same_json",
    "storable",
]
