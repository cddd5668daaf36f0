"""A filelock that tells who holds it, so a refused process can name the holder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import filelock


class LockHeldError(Exception):
    """The lock stayed taken for the whole timeout; `owner` says by whom, as far as known."""

    def __init__(self, path: Path, owner: str) -> None:
        super().__init__(f"{path} is held by {owner}")
        self.owner = owner


class OwnedLock:
    """`path` is the lock file; `<path>.owner` names the process holding it for a long time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.owner_path = Path(f"{self.path}.owner")
        self._lock = filelock.FileLock(str(self.path))

    def acquire(self, timeout: float, *, record_owner: bool = False) -> None:
        """Take the lock within `timeout` seconds or raise LockHeldError naming the holder."""
        try:
            self._lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise LockHeldError(self.path, self.owner()) from None
        if record_owner:
            try:
                self._record_owner()
            except BaseException:
                self._lock.release()  # a failed open must not keep the lock it could not note
                raise

    def _record_owner(self) -> None:
        note = f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        try:
            self.owner_path.write_text(note)  # buffered: a short write is retried, then raises
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.owner_path)) from exc

    def release(self) -> None:
        self._lock.release()

    def owner(self) -> str:
        try:
            return self.owner_path.read_text().strip() or "an unknown process"
        except OSError:
            return "an unknown process"
