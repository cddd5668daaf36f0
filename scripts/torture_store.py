#!/usr/bin/env python3
"""Torn-tail torture of the JSON-lines store: SIGKILL a writer at random moments, then check.

Each cycle starts a writer child that creates, attempts and resolves the next ids of one store
and prints each id only after its resolve returned. The parent SIGKILLs it at a random moment
(0-30 ms after its first printed id), reopens the store and checks that it opens (no damage
before the tail), that every printed id is resolved with its value, and that every earlier
confirmed id still is. About one cycle in ten arms the `store.append` failpoint, so the writer
is killed in the middle of a write and the reopen must move a torn tail aside.

    python scripts/torture_store.py --kills 1000 --seed 7

Prints one verdict line on stdout and exits 1 on any violation (keeping the store to inspect);
progress goes to stderr. 1000 kills take about 6 minutes on 2 cores: every cycle starts a
Python and reopens a store that keeps growing. tests/store/test_torture.py runs the same
torture with 100 kills by importing this file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from store import JsonlStore, Promise, State, StoreCorruptedError, StoreError  # noqa: E402
from store.codec import DamagedRecordError, decode  # noqa: E402

PREFIX = "torture/"
WRITER = "_writer"  # hidden sub-command that runs the child
KILL_WINDOW_S = 0.030
FAILPOINT_SHARE = 0.1  # share of cycles that kill the writer paused in mid-write
FIRST_LINE_TIMEOUT_S = 30.0
WRITER_LIFETIME_S = 60.0  # a writer nobody kills stops by itself


def promise_id(i: int) -> str:
    return f"{PREFIX}{i:08d}"


def index_of(promise_id: str) -> int:
    return int(promise_id.removeprefix(PREFIX))


def expected_value(i: int) -> dict[str, int]:
    return {"square": i * i}


# -- the writer child --------------------------------------------------------------------------


def write_until_killed(path: Path, *, exclusive: bool) -> None:
    """Settle ids in order from the first unresolved one; print each after its resolve returned.

    An id left pending by a killed writer is taken up again: its create is idempotent and its
    attempt count goes up.
    """
    deadline = time.monotonic() + WRITER_LIFETIME_S
    with JsonlStore(path, exclusive=exclusive) as store:
        i = resolved_count(store.list(PREFIX))
        while time.monotonic() < deadline:
            pid = promise_id(i)
            store.create(pid, {"i": i})
            store.start_attempt(pid)
            store.resolve(pid, expected_value(i))
            print(pid, flush=True)
            i += 1
    sys.exit("writer: nobody killed me")


def resolved_count(promises: list[Promise]) -> int:
    return sum(1 for p in promises if p.state is State.RESOLVED)


# -- one cycle: start a writer, kill it --------------------------------------------------------


@dataclass
class Cycle:
    """What one killed writer told us before it died."""

    confirmed: list[str]  # ids it printed: their resolve had returned
    paused_at: str | None  # the failpoint key it announced, when killed in mid-write
    problem: str | None  # why the cycle itself went wrong (not a store violation)


def writer_command(path: Path, exclusive: bool) -> list[str]:
    mode = "exclusive" if exclusive else "shared"
    return [sys.executable, str(Path(__file__).resolve()), WRITER, str(path), mode]


def writer_env(failpoint_key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    env["DURABLE_FAILPOINT_FD"] = "1"  # announcements arrive on stdout, in order with the ids
    if failpoint_key is not None:
        points = [{"name": "store.append", "key": failpoint_key, "action": "pause"}]
        env["DURABLE_FAILPOINTS"] = json.dumps(points)
    return env


def read_first_line(fd: int, timeout: float) -> bytes:
    """Bytes from `fd` up to and including its first newline; less on EOF or timeout."""
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data


def run_cycle(path: Path, rng: random.Random, next_index: int) -> Cycle:
    """Start a writer, SIGKILL it 0-30 ms after its first line (at once if that line is the
    failpoint's announcement), and collect what it printed."""
    failpoint_key = None
    if rng.random() < FAILPOINT_SHARE:
        failpoint_key = f"resolve:{promise_id(next_index + rng.randrange(3))}"
    exclusive = rng.random() < 0.5
    delay = rng.uniform(0, KILL_WINDOW_S)
    child = subprocess.Popen(
        writer_command(path, exclusive), env=writer_env(failpoint_key),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )
    try:
        first = read_first_line(child.stdout.fileno(), FIRST_LINE_TIMEOUT_S)
        if first.startswith(PREFIX.encode()):
            time.sleep(delay)
        exited_by_itself = child.poll() is not None
        child.send_signal(signal.SIGKILL)
        rest, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    confirmed, paused_at = parse_output(first + rest)
    problem = None
    if exited_by_itself or child.returncode != -signal.SIGKILL:
        problem = f"writer exited with status {child.returncode}: {err.decode()[-2000:]}"
    elif not first.endswith(b"\n"):
        problem = f"writer printed no line within {FIRST_LINE_TIMEOUT_S:.0f} s"
    return Cycle(confirmed, paused_at, problem)


def parse_output(output: bytes) -> tuple[list[str], str | None]:
    """The confirmed ids and the announced failpoint key in a writer's stdout."""
    confirmed, paused_at = [], None
    for line in output.split(b"\n")[:-1]:  # a last piece without a newline is not a whole line
        if line.startswith(b"{"):
            paused_at = json.loads(line)["key"]
        else:
            confirmed.append(line.decode())
    return confirmed, paused_at


# -- checking the store ------------------------------------------------------------------------


@dataclass
class Verdict:
    kills: int = 0
    mid_write_kills: int = 0
    confirmed: int = 0
    torn_repaired: int = 0
    compactions: int = 0
    lost: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.violations

    def line(self) -> str:
        return (
            f"{'OK' if self.ok else 'FAIL'}: kills={self.kills} "
            f"(mid-write {self.mid_write_kills}) settles_confirmed={self.confirmed} "
            f"torn_tails_repaired={self.torn_repaired} compactions={self.compactions} "
            f"lost={len(self.lost)} violations={len(self.violations)}"
        )


def torn_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.torn-*"))


def reopen_and_check(path: Path, confirmed: list[str], verdict: Verdict) -> dict[str, Promise]:
    """Reopen the store (repairing a torn tail) and record any confirmed id it lost."""
    try:
        with JsonlStore(path) as store:
            promises = {p.id: p for p in store.list(PREFIX)}
    except StoreCorruptedError as exc:
        verdict.violations.append(f"damage before the tail: {exc}")
        return {}
    for pid in confirmed:
        promise = promises.get(pid)
        if promise is None or promise.state is not State.RESOLVED:
            verdict.lost.append(pid)
        elif promise.value != expected_value(index_of(pid)):
            verdict.violations.append(f"{pid} resolved with {promise.value!r}")
    return promises


def check_torn_tail(path: Path, cycle: Cycle, new_torn: list[Path],
                    promises: dict[str, Promise], verdict: Verdict) -> None:
    """A writer killed in mid-write leaves exactly one torn tail: the start of its resolve."""
    if len(new_torn) > 1:
        verdict.violations.append(f"one kill left {len(new_torn)} torn tails: {new_torn}")
    if cycle.paused_at is None:
        return
    pid = cycle.paused_at.removeprefix("resolve:")
    head = json.dumps({"op": "resolve", "id": pid}, separators=(",", ":"))[:-1].encode()
    if len(new_torn) != 1 or not new_torn[0].read_bytes().startswith(head):
        verdict.violations.append(f"killed in mid-write of {pid}, but torn tails are {new_torn}")
    if pid in promises and promises[pid].state is not State.PENDING:
        verdict.violations.append(f"{pid} was cut in mid-write, yet it is {promises[pid].state}")


def check_every_line(path: Path, verdict: Verdict) -> None:
    """Every line of the file is a whole, checksummed record."""
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                if not line.endswith(b"\n"):
                    raise DamagedRecordError("no newline at the end")
                decode(line[:-1])
            except DamagedRecordError as exc:
                verdict.violations.append(f"{path}:{lineno}: {exc}")


def compact(path: Path, verdict: Verdict) -> None:
    try:
        with JsonlStore(path) as store:
            store.compact()
    except StoreError as exc:
        verdict.violations.append(f"compaction failed: {exc}")
    verdict.compactions += 1


# -- the torture -------------------------------------------------------------------------------


def torture(
    path: Path,
    kills: int,
    seed: int,
    compact_every: int = 50,
    progress: Callable[[str], None] | None = None,
) -> Verdict:
    """Kill `kills` writers of the store at `path`; stop at the first violation."""
    rng = random.Random(seed)
    verdict = Verdict()
    confirmed: list[str] = []
    promises = reopen_and_check(path, confirmed, verdict)
    while verdict.kills < kills and verdict.ok:
        torn_before = set(torn_files(path))
        cycle = run_cycle(path, rng, resolved_count(list(promises.values())))
        if cycle.problem:
            verdict.violations.append(f"kill {verdict.kills + 1}: {cycle.problem}")
            break
        verdict.kills += 1
        verdict.mid_write_kills += cycle.paused_at is not None
        confirmed += cycle.confirmed
        verdict.confirmed += len(cycle.confirmed)
        promises = reopen_and_check(path, confirmed, verdict)
        new_torn = sorted(set(torn_files(path)) - torn_before)
        verdict.torn_repaired += len(new_torn)
        check_torn_tail(path, cycle, new_torn, promises, verdict)
        if compact_every and verdict.kills % compact_every == 0 and verdict.ok:
            compact(path, verdict)
        if progress and verdict.kills % 100 == 0:
            progress(verdict.line())
    if verdict.ok and path.exists():
        check_every_line(path, verdict)
    return verdict


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == [WRITER]:
        write_until_killed(Path(args[1]), exclusive=args[2] == "exclusive")
        return 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=1000, help="writers to kill (1000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    parser.add_argument("--compact-every", type=int, default=50, metavar="N",
                        help="compact the store after every N kills, 0 for never (50)")
    parser.add_argument("--store", type=Path,
                        help="store file to torture (default: a new one in a temp dir)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the store's warning for each torn tail it cuts off")
    opts = parser.parse_args(args)
    logging.basicConfig(level=logging.WARNING if opts.verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    workdir = None
    if opts.store is None:
        workdir = Path(tempfile.mkdtemp(prefix="torture-store-"))
        opts.store = workdir / "promises.jsonl"

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    verdict = torture(opts.store, opts.kills, opts.seed, opts.compact_every, progress)
    print(verdict.line())
    for problem in verdict.violations + [f"lost {pid}" for pid in verdict.lost[:20]]:
        print(f"  {problem}", file=sys.stderr)
    if not verdict.ok:
        print(f"store kept for inspection: {opts.store}", file=sys.stderr)
        return 1
    if workdir is not None:
        for leftover in sorted(workdir.iterdir()):
            leftover.unlink()
        workdir.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
