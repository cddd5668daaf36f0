"""Fixtures of the workflow tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from store import MemoryStore, PromiseStore


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store.jsonl"


@pytest.fixture
def store() -> Iterator[PromiseStore]:
    """An in-memory store: where the file is not the point, the runtime runs on the contract alone
    (tests that reopen a store use `store_path` and the JSON-lines file)."""
    with MemoryStore() as s:
        yield s
