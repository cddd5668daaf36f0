"""The layers import one way only (`supervisor -> workflow -> store`), and the import application
stays an application: outside workflow/importer/, only the `run` command's wiring imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMPORTER = "workflow.importer"
RUN_WIRING = REPO / "supervisor" / "import_command.py"


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (inside functions too), relative ones resolved."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import mod`
    return found


def sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def importers_of(prefix: str, files: list[Path]) -> list[str]:
    return [str(f.relative_to(REPO)) for f in files
            if any(m == prefix or m.startswith(prefix + ".") for m in imported_modules(f))]


def test_only_the_run_wiring_imports_the_import_application() -> None:
    outside = [f for f in [*sources("supervisor"), *sources("workflow"), *sources("store")]
               if IMPORTER.replace(".", "/") not in str(f.relative_to(REPO)) and f != RUN_WIRING]
    assert importers_of(IMPORTER, outside) == []
    assert importers_of(IMPORTER, [RUN_WIRING]) == ["supervisor/import_command.py"]  # the check works


@pytest.mark.parametrize("lower, higher", [("store", "workflow"), ("store", "supervisor"),
                                           ("workflow", "supervisor")])
def test_a_lower_layer_imports_no_higher_one(lower: str, higher: str) -> None:
    assert importers_of(higher, sources(lower)) == []


def test_relative_imports_are_resolved() -> None:
    assert "workflow.importer.app" in imported_modules(REPO / "workflow" / "importer" / "__init__.py")
    assert "workflow.errors" in imported_modules(REPO / "workflow" / "importer" / "app.py")
