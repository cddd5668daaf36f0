"""Shared fixtures: every test writes only under its own tmp_path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from pgdb import pg_url  # noqa: F401  (a fresh PostgreSQL database per test)

REPO = Path(__file__).resolve().parent.parent


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def audit() -> ModuleType:
    """scripts/audit.py: the invariants of DESIGN.md, checked from the store file and the sink."""
    return _load_script("audit")


@pytest.fixture(scope="session")
def machines() -> ModuleType:
    """scripts/machines.py: machines sharing a PostgreSQL database, started and killed."""
    return _load_script("machines")


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def python() -> str:
    return sys.executable
