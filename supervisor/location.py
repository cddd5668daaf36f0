"""Where a supervised workflow's store lives: in a state dir (`--state-dir`), or at a URL (`--store`).

A state dir holds the store (`store.jsonl`), the supervisor's lock, and whatever the application
keeps beside them (the import's `import.db`). A store given by URL has no state dir: the
workflow lock of the store (one worker at a time) is then the only guard against a second
supervisor, whose worker is refused. A PostgreSQL store has both: the store (and the import's
sink) in the database, and this machine's state dir for its supervisor's lock.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from store import PromiseStore, StoreError, open_store
from store.backends import redact
from workflow.child import DEFAULT_STATE_DIR, STORE_FILE

SUPERVISOR_LOCK = "supervisor.lock"


@dataclass(frozen=True)
class StoreLocation:
    state_dir: Path | None
    url: str

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> StoreLocation:
        return cls(state_dir, str(state_dir / STORE_FILE))

    @classmethod
    def at_url(cls, url: str) -> StoreLocation:
        return cls(None, url)

    @classmethod
    def in_database(cls, url: str, state_dir: Path) -> StoreLocation:
        """A PostgreSQL store, and this machine's state dir beside it."""
        return cls(state_dir, url)

    @property
    def in_file(self) -> bool:
        """Whether the store is the state dir's own file (not a URL given apart)."""
        return self.state_dir is not None and self.url == str(self.state_dir / STORE_FILE)

    @property
    def lock_path(self) -> Path | None:
        """The supervisor's own lock: one supervisor per state dir."""
        return None if self.state_dir is None else self.state_dir / SUPERVISOR_LOCK

    def child_flags(self) -> list[str]:
        """How a worker (`python -m workflow run`) is told where the store is."""
        if self.state_dir is None:
            return ["--store", self.url]
        if not self.in_file:
            return ["--store", self.url, "--state-dir", str(self.state_dir)]
        return ["--state-dir", str(self.state_dir)]

    def report_entry(self) -> tuple[str, str]:
        """The key and value a report names the location with."""
        if self.state_dir is None or not self.in_file:
            return "store", redact(self.url)
        return "state_dir", str(self.state_dir)

    def cli_flags(self) -> str:
        """The location as a command line a person copies (empty for the default state dir)."""
        flags = "" if self.in_file else f" --store {shlex.quote(self.url)}"
        if self.state_dir is None or self.state_dir == DEFAULT_STATE_DIR.resolve():
            return flags
        return f"{flags} --state-dir {shlex.quote(str(self.state_dir))}"

    def create_if_missing(self, lock_timeout: float) -> None:
        """Create the store, empty, unless it exists: a worker refused before it opens the store
        (by its setup hook: a bad input, an unusable sink) still leaves one to inspect."""
        store = self.open_readonly()
        if store is None:
            store = open_store(self.url, lock_timeout=lock_timeout)
        store.close()

    def open_readonly(self) -> PromiseStore | None:
        """The store, opened to read only; None if nothing has created it yet."""
        try:
            return open_store(self.url, readonly=True)
        except StoreError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return None
            raise
