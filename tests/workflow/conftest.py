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

from store import Durability, JsonlStore  # noqa: E402  (needs the path above)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store.jsonl"


@pytest.fixture
def store(store_path: Path) -> Iterator[JsonlStore]:
    """A fast store of this test's own (no fsync: the tests kill processes, not the power)."""
    with JsonlStore(store_path, exclusive=True, durability=Durability.NONE) as s:
        yield s
