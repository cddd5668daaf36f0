"""Fixtures of the workflow tests; also puts the repository root first on sys.path.

Without it `import workflow` may find this very directory (tests/workflow, a namespace package)
instead of the real package, because pytest puts `tests/` on sys.path for the root conftest.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from store import MemoryStore, PromiseStore  # noqa: E402  (needs the path above)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store.jsonl"


@pytest.fixture
def store() -> Iterator[PromiseStore]:
    """An in-memory store: where the file is not the point, the runtime runs on the contract alone
    (tests that reopen a store use `store_path` and the JSON-lines file)."""
    with MemoryStore() as s:
        yield s
