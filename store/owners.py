"""Who holds a lease or a claim, written so that a process on the same machine can tell when
the holder is dead and need not wait for its lease to expire.

An owner reads `HOST pid PID (MACHINE) TOKEN`, where MACHINE names the kernel boot and the pid
namespace the pid belongs to: only a process that shares both can ask the kernel about that pid.
A holder found dead that way is taken over at once; one that is alive, or stopped, or anywhere
else, only once its lease expires.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import uuid

DEFAULT_LEASE_S = 5.0  # a lease or claim not renewed for this long is taken over


@functools.cache
def _machine() -> str:
    """This kernel's boot and this pid namespace: where a pid means one process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: no pid is ever judged dead from here
        return f"unknown-{uuid.uuid4().hex[:8]}"
    return f"{boot}:{namespace}"


def this_owner() -> str:
    """A new owner name for this process (unique per call)."""
    return f"{socket.gethostname()} pid {os.getpid()} ({_machine()}) {uuid.uuid4().hex[:8]}"


_OWNER = re.compile(r".* pid (\d+) \(([^)]*)\) \w+")


def is_dead_here(owner: str) -> bool:
    """Whether `owner` is a process of this machine and pid namespace that no longer exists."""
    match = _OWNER.fullmatch(owner)
    if match is None or match.group(2) != _machine():
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists (another user's)
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A killed process its parent has not reaped yet is dead too."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
