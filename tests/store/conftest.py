"""Fixtures of the store tests: every backend of the contract, each in its own place."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_contract import BACKENDS


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def place(backend: str, request: pytest.FixtureRequest) -> Path | str:
    """Where a backend keeps its promises: a tmp dir, or a fresh PostgreSQL database."""
    return request.getfixturevalue("pg_url" if backend == "postgresql" else "tmp_path")
