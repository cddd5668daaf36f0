"""The file-locked, append-only JSON-lines promise store.

Layout: `<path>` holds one checksummed record per line (see codec.py); `<path>.lock` is the
filelock every appender takes; `<path>.lock.owner` names the last process to hold it exclusively;
`<path>.torn-<n>` keeps the bytes of a torn last line cut off when the store was opened (they
pile up, one per recovery, until `collect_set_aside` deletes them); `<path>.compact` is the new
file of a compaction, renamed over `<path>` when it is whole;
`<path>.root-<digest>.lock` is the lock of one root workflow's driver in a shared store;
`<path>.cancel-<digest>` is an operator's request to cancel that root workflow: a file of its
own, so that it can be made while a worker holds the store's lock (the worker looks for it
between steps).

Locking: a *shared* store takes the lock around every append (about 100 µs), so any number of
processes can append to one file. An *exclusive* store takes it once at open and holds it until
close, so a durable settle costs one write plus one fdatasync; that is how a workflow worker
opens its store, and it makes a second worker on the same store fail fast. An exclusive store
also holds a new promise's `create` back until its next write, so a step's creation and first
attempt are one line (other processes see the creation with that line).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from . import failpoints
from .codec import DamagedRecordError, decode, encode
from .errors import (
    StoreCorruptedError,
    StoreError,
    StoreLockedError,
    StoreWriteError,
    WorkflowBusyError,
)
from .fsutil import fsync_dir, write_all, write_synced_file
from .indexed import IndexedStore
from .locking import LockHeldError, OwnedLock
from .log import (
    Entry,
    InvalidRecordError,
    apply,
    snapshot,
    snapshot_record,
)
from .promise import Promise

log = logging.getLogger(__name__)
T = TypeVar("T")
_CHUNK = 1 << 20
TORN_SUFFIX = ".torn-"  # `<store>.torn-<n>`: the bytes of a torn last line, cut off on open
COMPACTING_SUFFIX = ".compact"  # the new file a compaction writes, then renames over the store


class Durability(StrEnum):
    """How far a settle is on its way to the disk when `resolve`/`reject` return.

    FULL: fdatasync'ed; survives a process kill and a power loss (the default).
    NONE: written to the OS page cache only; survives a process kill, not a power loss or a
    kernel crash. Meant for tests and benchmarks.
    """

    FULL = "full"
    NONE = "none"


class JsonlStore(IndexedStore):
    """Durable promises in one append-only JSON-lines file.

    `exclusive=True` holds the store's lock from open to close (one writer, the fast path);
    `readonly=True` only reads: it never takes the lock, never repairs, and stops at a torn tail.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = Durability.FULL,
        exclusive: bool = False,
        readonly: bool = False,
        lock_timeout: float = 30.0,
    ) -> None:
        if exclusive and readonly:
            raise ValueError("a store cannot be both exclusive and readonly")
        self.path = Path(path)
        self.durability = Durability(durability)
        self._exclusive = exclusive
        self._readonly = readonly
        self._lock_timeout = lock_timeout
        # Locks are named after the real file, so two paths to one store (a symlink) share them.
        self._lock_base = os.path.realpath(self.path)
        self._lock = None if readonly else OwnedLock(f"{self._lock_base}.lock")
        self._holding_lock = False
        self._failed: str | None = None  # why writing must stop (a failed sync): reopen to go on
        self._held: dict[str, dict[str, Any]] = {}  # an exclusive store's creates, not yet written
        self._index: dict[str, Entry] = {}
        self._offset = 0  # bytes of whole, indexed lines
        self._lines = 0
        self._fd = -1
        self._ino = 0
        self._mutex = threading.RLock()  # the process's threads take turns at the index and file
        self._sync_turn = threading.Condition()  # group commit: one thread syncs for all
        self._syncing = False
        self._written = 0  # bytes this object has written, ever
        self._synced = -1  # `_written` at the last sync (-1: nothing synced by us yet)
        self._open()

    # -- public interface ------------------------------------------------------------------

    def own(self, root_id: str) -> contextlib.AbstractContextManager[None]:
        """Hold the right to drive the workflow `root_id` (run its steps and settle them).

        Takes a lock of the root's own, in every mode, waiting up to `lock_timeout`: a second
        driver (another process, another thread, a shared opener beside an exclusive one, another
        path to the same file) gets WorkflowBusyError naming the holder's pid before it can run
        anything. The store lock alone would not do: a shared writer holds it only per append.
        """
        if self._readonly:
            raise StoreError(f"{self.path}: store was opened read-only")
        return _owning(OwnedLock(f"{self._lock_base}.root-{_digest(root_id)}.lock"), root_id,
                       self._lock_timeout)

    def request_cancel(self, root_id: str) -> None:
        """Write the request file (synced, and its directory entry) unless it is there."""
        self._check(root_id)
        path = self._cancel_path(root_id)
        try:
            write_synced_file(path, [root_id.encode()], overwrite=False)
        except FileExistsError:
            pass  # made before, perhaps by a caller killed before it synced the directory
        except OSError as exc:
            raise StoreWriteError(f"{path}: cannot record the cancel request ({exc.strerror})") from exc
        self._sync_dir_of(path, "recording the cancel request")

    def cancel_requested(self, root_id: str) -> bool:
        self._check(root_id)
        return self._cancel_path(root_id).exists()

    def withdraw_cancel(self, root_id: str) -> None:
        self._check(root_id)
        path = self._cancel_path(root_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreWriteError(f"{path}: cannot withdraw the cancel request ({exc.strerror})") from exc
        self._sync_dir_of(path, "withdrawing the cancel request")

    def _cancel_path(self, root_id: str) -> Path:
        return Path(f"{self._lock_base}.cancel-{_digest(root_id)}")

    def _sync_dir_of(self, path: Path, action: str) -> None:
        try:
            fsync_dir(path.parent)
        except OSError as exc:
            raise StoreWriteError(f"{path.parent}: {action} failed to sync ({exc.strerror})") from exc

    def compact(self) -> None:
        """Rewrite the file with one record per promise and swap it in atomically."""
        self._locked(self._compact)

    def close(self, *, discard_held: bool = False) -> None:
        """Write what is held back (unless discarded), close the file, release an exclusive lock."""
        if discard_held:
            self._held = {}  # a creation is never synced anyway: the replay makes it again
        self._closed = True
        fd, self._fd = self._fd, -1
        try:
            if fd >= 0 and self._failed is None and (self._held or self._deferred):
                self._fd = fd
                try:
                    self._write_held()
                    if self._deferred:  # a deferred settle is durable by the time we are closed
                        self._sync_written()
                finally:
                    self._fd = -1
        finally:
            if fd >= 0:
                os.close(fd)
            if self._exclusive and self._holding_lock:
                self._holding_lock = False
                self._lock.release()

    def __exit__(self, exc_type: object, *_: object) -> None:
        # Leaving on an error, write nothing more: a failed write must not hide that error.
        self.close(discard_held=exc_type is not None)

    def __repr__(self) -> str:
        mode = "exclusive" if self._exclusive else "readonly" if self._readonly else "shared"
        return f"JsonlStore({str(self.path)!r}, {mode}, durability={self.durability.value})"

    # -- opening and reading ---------------------------------------------------------------

    def _open(self) -> None:
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, not a store file")
        parent = self.path.parent
        if not self._readonly and not parent.is_dir():  # else taking the lock would make it
            why = "is not a directory" if parent.exists() else "does not exist (create it first)"
            raise StoreError(f"{self.path}: the directory {parent} {why}")
        try:
            if self._exclusive:  # lock first: the file we open is then the one we hold
                self._acquire_exclusive()
            self._fd = self._open_fd()
            if self._readonly:
                self._load_from_start()
            else:
                self._locked(self._load_from_start)
        except OSError as exc:
            self.close()
            raise StoreError(f"{self.path}: cannot open store ({exc.strerror})") from exc
        except BaseException:
            self.close()
            raise

    def _open_fd(self) -> int:
        if self._readonly:
            return os.open(self.path, os.O_RDONLY)
        flags = os.O_RDWR | os.O_APPEND
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return os.open(self.path, flags)
        fsync_dir(self.path.parent)
        return fd

    def _acquire_exclusive(self) -> None:
        self._acquire_lock(record_owner=True)
        self._holding_lock = True

    def _acquire_lock(self, *, record_owner: bool = False) -> None:
        try:
            self._lock.acquire(self._lock_timeout, record_owner=record_owner)
        except LockHeldError as exc:
            raise StoreLockedError(self.path, exc.owner) from None
        except OSError as exc:
            where = exc.filename or self._lock.path
            raise StoreError(f"{self.path}: cannot take the lock ({where}: {exc.strerror})") from exc

    def _load_from_start(self) -> None:
        self._index = {}
        self._offset = 0
        self._lines = 0
        self._ino = os.fstat(self._fd).st_ino
        self._load_new_lines()

    def _refresh(self) -> None:
        """Index what other processes appended (or re-read a file another process compacted)."""
        if self._exclusive:
            return  # we hold the lock: nobody else has written since we did
        with self._mutex:  # one thread at a time reads on from the offset
            self._refresh_shared()

    def _refresh_shared(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise StoreError(f"{self.path}: store file disappeared") from None
        if st.st_ino != self._ino:
            os.close(self._fd)
            self._fd = self._open_fd()
            self._load_from_start()
        elif st.st_size != self._offset:
            self._load_new_lines()

    def _load_new_lines(self) -> None:
        """Index whole lines from the last offset; deal with a damaged or unfinished last line.

        The hot loop of opening a store: it reads 1 MiB at a time and folds each line in place.
        """
        index, path = self._index, self.path
        damaged: tuple[int, int, str] | None = None  # line number, offset, reason
        pos, lineno, rest = self._offset, self._lines, b""
        read_at = pos
        while chunk := os.pread(self._fd, _CHUNK, read_at):
            read_at += len(chunk)
            *lines, rest = (rest + chunk).split(b"\n")
            try:
                for line in lines:
                    if damaged is not None:
                        raise StoreCorruptedError(path, damaged[0], damaged[2])
                    lineno += 1
                    try:
                        apply(index, decode(line))
                    except DamagedRecordError as exc:
                        damaged = (lineno, pos, str(exc))
                        continue
                    except InvalidRecordError as exc:
                        raise StoreCorruptedError(path, lineno, f"invalid record: {exc}") from None
                    pos += len(line) + 1
            finally:  # what is indexed so far stays consistent with where reading goes on
                self._offset, self._lines = pos, lineno - (damaged is not None)
        if rest:
            if damaged is not None:
                raise StoreCorruptedError(path, damaged[0], damaged[2])
            damaged = (lineno + 1, pos, "line has no end (torn write)")
        if damaged is not None and self._holding_lock:
            self._cut_torn_tail(*damaged)

    def _cut_torn_tail(self, lineno: int, start: int, reason: str) -> None:
        """Move a torn last line aside into `<store>.torn-<n>`, then truncate it away."""
        size = os.fstat(self._fd).st_size
        tail = os.pread(self._fd, size - start, start)
        n = 1
        while (side := Path(f"{self.path}{TORN_SUFFIX}{n}")).exists():
            n += 1
        try:
            write_synced_file(side, [tail], overwrite=False)
        except OSError as exc:
            raise StoreWriteError(
                f"{side}: cannot save the torn last line of {self.path} ({exc.strerror}); "
                "the store is unchanged"
            ) from exc
        fsync_dir(self.path.parent)  # the saved bytes are on disk before the tail goes
        os.ftruncate(self._fd, start)
        os.fsync(self._fd)
        log.warning(
            "%s:%d: cut off a torn last line (%d bytes, %s); its bytes are saved in %s",
            self.path, lineno, len(tail), reason, side,
        )

    # -- writing ---------------------------------------------------------------------------

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` holding the store lock, with the index refreshed under it."""
        if self._readonly:
            raise StoreError(f"{self.path}: store was opened read-only")
        with self._mutex:
            if self._failed is not None:
                raise StoreWriteError(f"{self.path}: {self._failed}; reopen the store")
            if self._holding_lock:
                return fn(*args)
            self._acquire_lock()
            self._holding_lock = True
            try:
                if self._ino:
                    self._refresh()
                return fn(*args)
            finally:
                self._holding_lock = False
                self._lock.release()

    def _append_create(self, record: dict[str, Any]) -> Promise:
        if not self._exclusive:
            return self._append(record)
        # Held back until the next write, so that a step's creation and its first attempt
        # become one line (several creations may wait: the calls a workflow begins together).
        # Other processes only read an exclusive store (status), and see the creation with
        # that line; a create is not synced anyway: if the process dies first, the replay
        # creates it again.
        self._held[record["id"]] = record
        apply(self._index, record)
        return snapshot(record["id"], self._index[record["id"]])

    def _append_attempt(self, record: dict[str, Any]) -> None:
        promise_id = record["id"]
        held = self._held
        if promise_id not in held:
            self._append(record)
            return
        if next(iter(held)) != promise_id:
            self._write_held(before=promise_id)  # the file keeps the order of creation
        self._write({**self._held[promise_id], "n": record["n"]})
        del self._held[promise_id]
        apply(self._index, record)

    def _append(self, record: dict[str, Any]) -> Promise:
        """Write one record (after its promise's creation, if that is held), fold it in."""
        if record["id"] in self._held:
            self._write_held(before=record["id"])
            self._write_held(only=record["id"])
        self._write(record)
        apply(self._index, record)
        return snapshot(record["id"], self._index[record["id"]])

    def _write_held(self, *, before: str | None = None, only: str | None = None) -> None:
        """Write the held creations: all, those held before `before`, or `only` that one."""
        for promise_id in [only] if only is not None else list(self._held):
            if promise_id == before:
                return
            self._write(self._held[promise_id])
            del self._held[promise_id]  # only once written: a failed write keeps it held

    def _write(self, record: dict[str, Any]) -> None:
        """Write one record (a settle is synced after, by `_sync_written`)."""
        line = encode(record)
        if failpoints.armed:
            self._torn_write_failpoint(record, line)
        self._write_bytes(line)
        self._offset += len(line)
        self._written += len(line)
        self._lines += 1

    def _sync_written(self) -> None:
        """Sync what this object wrote; threads that wait here together share one fdatasync.

        The first thread to find the file unsynced syncs everything written so far while the
        others wait (and write their own settles meanwhile); one that finds its writes covered
        by that sync returns without syncing again: group commit.
        """
        if self._readonly or self.durability is not Durability.FULL:
            return
        with self._sync_turn:
            target = self._written
            while self._synced < target:
                if self._failed is not None:
                    raise StoreWriteError(f"{self.path}: {self._failed}; reopen the store")
                if self._syncing:
                    self._sync_turn.wait()
                    continue
                self._syncing, upto = True, self._written
                self._sync_turn.release()
                try:
                    self._sync()
                finally:
                    self._sync_turn.acquire()
                    self._syncing = False
                    self._sync_turn.notify_all()
                self._synced = max(self._synced, upto)

    def _write_bytes(self, data: bytes) -> None:
        """Append all of `data`, or cut what a failed write left and raise StoreWriteError."""
        try:
            write_all(self._fd, data)
        except OSError as exc:
            self._undo_partial_write()
            raise StoreWriteError(
                f"{self.path}: cannot append to the store ({exc.strerror}); nothing was written"
            ) from exc

    def _sync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            # The kernel may have dropped the dirty pages: retrying would report a false success.
            self._failed = f"an earlier sync failed (fdatasync: {exc.strerror})"
            raise StoreWriteError(f"{self.path}: fdatasync failed ({exc.strerror})") from exc

    def _undo_partial_write(self) -> None:
        """Cut what a failed write left, so the file ends with a whole line again."""
        try:
            os.ftruncate(self._fd, self._offset)
        except OSError as exc:
            self._failed = f"could not cut a partial write ({exc.strerror})"

    def _torn_write_failpoint(self, record: dict[str, Any], line: bytes) -> None:
        """`store.append` failpoint: write half the line, then pause to be killed mid-write
        (or raise, like a failed write); `delay` only waits before the write."""
        key = failpoints.store_append_key(record["op"], record["id"])
        what = failpoints.action(failpoints.STORE_APPEND, key)
        if what == "delay":
            failpoints.hit(failpoints.STORE_APPEND, key)
        elif what is not None:
            self._write_bytes(line[: len(line) // 2])
            try:
                failpoints.hit(failpoints.STORE_APPEND, key)
            except BaseException:  # "raise": a write that failed; cut what it left
                self._undo_partial_write()
                raise

    def _compact(self) -> None:
        self._write_held()
        tmp = Path(f"{self.path}{COMPACTING_SUFFIX}")
        try:
            write_synced_file(tmp, self._snapshot_chunks(), overwrite=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreWriteError(
                f"{self.path}: compaction failed ({tmp}: {exc.strerror}); the store is unchanged"
            ) from exc
        os.close(self._fd)  # from here on, write to the new file only
        self._fd = self._open_fd()
        self._load_from_start()
        self._synced = self._written  # the new file was synced whole
        try:
            fsync_dir(self.path.parent)
        except OSError as exc:
            # A power loss may bring the old file back, without what is written from now on.
            self._failed = f"the directory sync after a compaction failed ({exc.strerror})"
            raise StoreWriteError(f"{self.path}: {self._failed}") from exc

    def _snapshot_chunks(self) -> Iterator[bytes]:
        """One "promise" line per promise, joined 1024 at a time."""
        lines: list[bytes] = []
        for pid, entry in self._index.items():
            lines.append(encode(snapshot_record(snapshot(pid, entry))))
            if len(lines) == 1024:
                yield b"".join(lines)
                lines.clear()
        yield b"".join(lines)


def set_aside_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files beside the store at `path` that no open reads again: the torn last lines cut
    off on open (`<path>.torn-<n>`, kept for a person to look at) and the new file of a
    compaction that was killed before its rename (`<path>.compact`)."""
    path = Path(path)
    torn = [p for p in path.parent.glob(f"{glob.escape(path.name)}{TORN_SUFFIX}*")
            if p.name.removeprefix(path.name + TORN_SUFFIX).isdigit()]
    compacting = Path(f"{path}{COMPACTING_SUFFIX}")
    found = sorted(torn, key=lambda p: int(p.name.rpartition("-")[2]))
    return [*found, compacting] if compacting.exists() else found


def collect_set_aside(path: str | os.PathLike[str], *, lock_timeout: float) -> list[Path]:
    """Delete the set-aside files of the store at `path` that predate an open of it made here:
    the open takes the store's lock (StoreLockedError while a worker holds it) and recovers a
    torn tail first, so nothing deleted is still needed, and a tail it cuts now is kept (it is
    younger than this open) until the next collection. Returns the files deleted."""
    before = set_aside_files(path)
    with JsonlStore(path, exclusive=True, lock_timeout=lock_timeout):
        for side in before:  # under the lock: no compaction is writing its new file meanwhile
            side.unlink(missing_ok=True)
    return before

def _digest(root_id: str) -> str:
    """The part of a root's own files' names that stands for its id (any id makes a file name)."""
    return hashlib.sha256(root_id.encode()).hexdigest()[:16]

@contextlib.contextmanager
def _owning(lock: OwnedLock, root_id: str, timeout: float) -> Iterator[None]:
    try:
        lock.acquire(timeout, record_owner=True)
    except LockHeldError as exc:
        raise WorkflowBusyError(root_id, exc.owner) from None
    except OSError as exc:
        raise StoreError(f"cannot take the lock {lock.path} ({exc.strerror})") from exc
    try:
        yield
    finally:
        lock.release()
