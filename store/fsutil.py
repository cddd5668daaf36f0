"""Writing files and directories so that what the store reports done is whole and on the disk.

Every function raises OSError when the disk says no; callers turn it into an error naming the
file. A short write is never taken for success: on a full disk (or past RLIMIT_FSIZE, whose
SIGXFSZ Python ignores) `write()` returns fewer bytes, and the next one fails with the reason.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data`, or raise OSError (ENOSPC, EFBIG, ...)."""
    written = os.write(fd, data)
    if written == len(data):  # nearly always: one call, no view
        return
    view = memoryview(data)[written:]
    while view:
        written = os.write(fd, view)
        if written == 0:  # never for a regular file; without it, a loop that never ends
            raise OSError(errno.EIO, "write() made no progress")
        view = view[written:]


def write_synced_file(path: Path, chunks: Iterable[bytes], *, overwrite: bool) -> None:
    """Create `path` holding `chunks`, fsync'ed; on any failure remove it again and raise.

    `overwrite=False` refuses an existing file (FileExistsError), and leaves it alone.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o644)
    try:
        try:
            for chunk in chunks:
                write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (a new file, a rename) survive a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike[str]) -> None:
    """Create `path` and its missing parents one by one, syncing the parent of each one created.

    Like `mkdir(parents=True, exist_ok=True)`, but a directory made here survives a power loss
    as soon as this returns. Raises FileExistsError if `path` exists and is not a directory.
    """
    missing: list[Path] = []
    directory = Path(path)
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            if not directory.is_dir():
                raise
            # Another process made it meanwhile; it may not have synced its parent yet.
        fsync_dir(directory.parent)
    if not Path(path).is_dir():
        raise FileExistsError(errno.EEXIST, "File exists (not a directory)", str(path))
