"""Which import a `run` starts or continues: the default id, and one-line refusals instead of a
second import that strands the first.

The default id is derived from the input's content: `import/<the first 16 hex digits of the
file's SHA-256>` (`import/synthetic-N` for N synthetic records), so the batch size, the file's
name and where it lies do not change it. An id that holds an import already is continued with
the arguments that import recorded, provided the run asks for the same thing; otherwise it is
refused in one line saying how to continue it or start a new one (`--id NEW`):
- another input (content) under an id given with `--id`;
- another `--batch-size`, `--delimiter`, `--encoding` or `--map`;
- the same content at another path (the import reads the file where it was started).

Earlier versions derived `import/<name>-<sha12>-b<B>` (`import/synthetic-N-bB`); without `--id`,
an import of the same content under such an id is found and treated the same way, so an import
started by them is never stranded.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store import Promise, PromiseStore, State

from ..history import recorded_call, records_call_of
from ..ids import is_root
from .app import import_records
from .sources import SourceError, check_arguments, reading_options, same_content

DIGEST_CHARS = 16  # of the SHA-256 in a file's default id: 64 bits, no collision in practice


class ImportMismatchError(Exception):
    """The id holds an import that this run would not continue as it asks; the message says
    how to continue that import or start a new one."""


@dataclass(frozen=True)
class ImportToRun:
    """The import's id and the arguments its worker gets (those recorded, when it exists)."""

    root_id: str
    source: dict[str, Any]
    batch_size: int


def default_id(source: dict[str, Any]) -> str:
    """`import/<sha256 prefix>` for a file, `import/synthetic-N` for the synthetic input."""
    if source["kind"] == "synthetic":
        return f"import/synthetic-{source['records']}"
    return f"import/{source['sha256'][:DIGEST_CHARS]}"


def import_to_run(
    store: PromiseStore | None, source: dict[str, Any], batch_size: int, given_id: str | None
) -> ImportToRun:
    """The import this run drives: the one its id holds (checked to be what the run asks for),
    or a new one. `store` is None when nothing has created the store yet."""
    root_id = given_id or default_id(source)
    root = None if store is None else store.get(root_id)
    if root is None and given_id is None and store is not None:
        root = _earlier_default(store, source, batch_size)
    if root is None:
        return ImportToRun(root_id, source, batch_size)
    recorded_source, recorded_batch_size = _recorded_import(root)
    _refuse_unless_same(root, recorded_source, recorded_batch_size, source, batch_size)
    return ImportToRun(root.id, recorded_source, recorded_batch_size)


def _earlier_default(store: PromiseStore, source: dict[str, Any], batch_size: int) -> Promise | None:
    """An import of the same input under an id an earlier version derived (any batch size): the
    one with this batch size, else a pending one, else any."""
    if source["kind"] == "synthetic":
        label = f"synthetic-{source['records']}"
    else:
        label = f"{Path(source['path']).stem.replace('.', '_')}-{source['sha256'][:12]}"
    roots = [p for p in store.list(f"import/{label}-b")
             if is_root(p.id) and records_call_of(p, import_records)]
    roots.sort(key=lambda p: (p.id != f"import/{label}-b{batch_size}", p.state is not State.PENDING))
    return roots[0] if roots else None


def _recorded_import(root: Promise) -> tuple[dict[str, Any], int]:
    call = recorded_call(root)
    if call is None or not records_call_of(root, import_records) or len(call.args) != 2:
        what = "something other than a workflow" if call is None else f"the workflow {call.fn}"
        raise ImportMismatchError(f"{root.id} holds {what}, not an import; give this import another --id")
    source, batch_size = call.args
    try:
        check_arguments(source, batch_size)
    except (SourceError, ValueError) as exc:
        raise ImportMismatchError(f"{root.id} holds an import with unusable arguments ({exc}); "
                                  "give this import another --id") from None
    return source, batch_size


def _refuse_unless_same(
    root: Promise, recorded: dict[str, Any], recorded_batch_size: int,
    source: dict[str, Any], batch_size: int,
) -> None:
    state = _STATE_WORDS.get(root.state, root.state.value)
    if not same_content(recorded, source):
        raise ImportMismatchError(
            f"import {root.id} already exists ({state}) for another input ({_input_text(recorded)}, "
            f"not {_input_text(source)}); give this one another --id")
    differ = _flags(recorded, recorded_batch_size, source, batch_size)
    if differ:
        raise ImportMismatchError(
            f"import {root.id} already exists ({state}), started {' '.join(differ)}: give the same "
            "to continue it (or to see its result), or add --id NEW to start a new import")
    if recorded["kind"] != "synthetic" and recorded["path"] != source["path"]:
        raise ImportMismatchError(
            f"import {root.id} already exists ({state}), reading this content from {recorded['path']}: "
            f"run with --input {shlex.quote(recorded['path'])} to continue it, or add --id NEW to "
            "start a new import")


_STATE_WORDS = {State.PENDING: "pending", State.RESOLVED: "done", State.REJECTED: "failed"}


def _flags(
    recorded: dict[str, Any], recorded_batch_size: int, source: dict[str, Any], batch_size: int
) -> list[str]:
    """`with FLAG VALUE` (or `without FLAG`) for each option the two runs give differently."""
    was, now = reading_options(recorded), reading_options(source)
    differ = []
    if recorded_batch_size != batch_size:
        differ.append(f"with --batch-size {recorded_batch_size}")
    for option, flag, shown in _OPTIONS:
        if was.get(option) != now.get(option):
            value = shown(was.get(option))
            differ.append(f"with {flag} {shlex.quote(value)}" if value else f"without {flag}")
    return differ


def _delimiter_text(value: Any) -> str:
    return "tab" if value == "\t" else str(value)


def _map_text(columns: Any) -> str:
    return ",".join(f"{field}={column}" for field, column in (columns or {}).items())


_OPTIONS = (
    ("delimiter", "--delimiter", _delimiter_text),
    ("encoding", "--encoding", str),
    ("columns", "--map", _map_text),
)


def _input_text(source: dict[str, Any]) -> str:
    if source["kind"] == "synthetic":
        return f"{source['records']} synthetic records"
    return f"{source['path']}, sha256 {source['sha256'][:12]}"
