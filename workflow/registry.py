"""Durable functions by name and version, so a store can say which code wrote it."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import WorkflowUsageError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Registered:
    fn: Callable[..., Any]
    name: str
    version: int
    recover: Callable[..., Any] | None = None
    is_workflow: bool = field(init=False)

    def __post_init__(self) -> None:
        # A generator function is a (sub-)workflow driven by replay; anything else is a step.
        object.__setattr__(self, "is_workflow", inspect.isgeneratorfunction(self.fn))


_by_fn: dict[Callable[..., Any], Registered] = {}
_by_name: dict[tuple[str, int], Registered] = {}


def register(
    fn: F | None = None,
    *,
    name: str | None = None,
    version: int = 1,
    recover: Callable[..., Any] | None = None,
) -> F | Callable[[F], F]:
    """Register a workflow or step under a stable name (default: module.qualname) and version.

    Bump the version when a change would replay differently; a store written by the old
    version is then refused instead of silently mixed with the new code.

    `recover` (steps only) is called with the step's arguments before a step whose earlier
    attempt never settled runs again: it returns the result that attempt already made durable
    (say, a committed transaction), or None when there is none. A found result settles the step
    without starting an attempt, so a step whose effect is committed is never failed for lack
    of attempts.
    """

    def add(f: F) -> F:
        entry = Registered(f, name or default_name(f), version, recover)
        if recover is not None and entry.is_workflow:
            raise ValueError(f"{entry.name}: only a step can have a recover function, not a workflow")
        clash = _by_name.get((entry.name, entry.version))
        if clash is not None and clash.fn is not f:
            raise ValueError(f"{entry.name} v{entry.version} is already registered to {clash.fn!r}")
        _by_fn[f] = entry
        _by_name[(entry.name, entry.version)] = entry
        return f

    return add(fn) if fn is not None else add


def describe(fn: Callable[..., Any]) -> Registered:
    """The registered name and version of `fn`; an unregistered function is module.qualname v1."""
    entry = _by_fn.get(fn)
    if entry is None:
        entry = Registered(fn, default_name(fn), 1)
        _by_fn[fn] = entry
    return entry


def default_name(fn: Callable[..., Any]) -> str:
    """`module.qualname`, the same however the program was started.

    A script's functions live in `__main__`; they are named after the script's import name, so
    `python script.py` and `python -m script` record the same names. Lambdas have no name of
    their own (two in one scope look the same), so an unregistered one is refused.
    """
    qualname = getattr(fn, "__qualname__", None)
    if qualname is None:
        raise WorkflowUsageError(f"{fn!r} is not a function: a durable call needs a named function")
    if "<lambda>" in qualname:
        raise WorkflowUsageError(
            f"{qualname} (in {fn.__module__}) has no name of its own: a durable call needs a def, "
            "or register the lambda: register(fn, name=...)"
        )
    module = fn.__module__
    if module == "__main__":
        module = _main_module_name()
    return f"{module}.{qualname}"


def _main_module_name() -> str:
    """The import name of the running script: from `-m`, or from its path and packages."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    path = getattr(main, "__file__", None)
    if path is None:  # an interactive session
        return "__main__"
    path = Path(path).resolve()
    parts = [path.stem]
    folder = path.parent
    while (folder / "__init__.py").exists():
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts)


def versions(name: str) -> list[int]:
    """The versions registered under `name`, oldest first."""
    return sorted(v for (n, v) in _by_name if n == name)


def registered(name: str, version: int | None = None) -> Registered | None:
    """`name` at `version` (default: its latest version), if registered."""
    if version is None:
        known = versions(name)
        if not known:
            return None
        version = known[-1]
    return _by_name.get((name, version))


def lookup(name: str, version: int) -> Callable[..., Any]:
    """The function registered as `name` v`version`, or a KeyError saying what is registered."""
    entry = _by_name.get((name, version))
    if entry is None:
        known = [f"v{v}" for v in versions(name)]
        raise KeyError(f"no function {name} v{version} is registered (known: {known or 'none'})")
    return entry.fn
