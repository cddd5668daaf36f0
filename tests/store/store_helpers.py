"""Helpers shared by the store tests: raw looks at a store file and child Python processes."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock

REPO = Path(__file__).resolve().parents[2]

# Run argv[1:] with Python after dropping the capabilities that let root ignore file modes
# (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) from the bounding set: after exec, root
# then obeys chmod like anyone else. Exits 77 when the kernel refuses (no CAP_SETPCAP).
_DROP_DAC_AND_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2, 3):
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit(77)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""
NO_DAC_OVERRIDE = 77


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child that imports `store`: no failpoints unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def python_argv(code: str, *args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def run_python(
    code: str,
    *args: str | os.PathLike[str],
    timeout: float = 60,
    as_plain_user: bool = False,
    file_size_limit: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `code` in a child Python; `as_plain_user` makes root obey file modes there too, and
    `file_size_limit` (RLIMIT_FSIZE, in bytes) fills the disk for it: a write past the limit is
    cut short or fails with EFBIG (Python ignores SIGXFSZ)."""
    argv = python_argv(code, *args)
    if as_plain_user and os.geteuid() == 0:
        argv = [sys.executable, "-c", _DROP_DAC_AND_EXEC, *argv[1:]]
    return subprocess.run(
        argv, env=child_env(), capture_output=True, text=True, timeout=timeout, check=False,
        preexec_fn=None if file_size_limit is None else _limit_file_size(file_size_limit),
    )


def _limit_file_size(limit: int) -> Callable[[], None]:
    """A preexec_fn; only the soft limit, so the child may lift it again."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def raw_lines(path: Path) -> list[bytes]:
    """The file's lines without their newlines; asserts the file ends with one (or is empty)."""
    data = path.read_bytes()
    if not data:
        return []
    assert data.endswith(b"\n"), f"{path} does not end with a newline"
    return data[:-1].split(b"\n")


def checksum_is_valid(line: bytes) -> bool:
    """Check a line's crc independently of store.codec: CRC-32 of the object without it."""
    record = json.loads(line)
    if list(record)[-1] != "crc":
        return False
    body = line[: line.rindex(b',"crc":"')] + b"}"
    return zlib.crc32(body) == int(record["crc"], 16)


def records(path: Path) -> list[dict[str, Any]]:
    """Every record of the file, each checked to be JSON with a valid trailing checksum."""
    lines = raw_lines(path)
    assert all(checksum_is_valid(line) for line in lines)
    return [json.loads(line) for line in lines]


def torn_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.torn-*"))


def lock_is_free(path: Path) -> bool:
    """Whether a newcomer could take the store's lock right now."""
    lock = filelock.FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return False
    lock.release()
    return True


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def line_offset(path: Path, lineno: int) -> int:
    """Byte offset of the start of line `lineno` (1-based)."""
    data = path.read_bytes()
    offset = 0
    for _ in range(lineno - 1):
        offset = data.index(b"\n", offset) + 1
    return offset
