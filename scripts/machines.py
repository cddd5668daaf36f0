#!/usr/bin/env python3
"""Machines on one host that share nothing but a PostgreSQL database: the crash tests' and
`scripts/chaos.sh --store`'s way to run an import on several machines and kill them.

A machine is `python -m supervisor run|join --store URL ...` started in a session of its own,
in a working directory and a state dir of its own: its supervisor, its worker (the participant:
the driver, or a driver standing by) and its executors (`python -m workflow execute`) are one
process tree, SIGKILLed at once when the machine dies. Where the kernel lets us (as root), each
machine also gets a pid namespace of its own (`unshare --pid`): the store then sees another
machine, whose pids it cannot ask the kernel about, so a dead machine's lease and claims are
taken over when they expire (5 s), not at once as on one machine. The machines share the
server's address (127.0.0.1): a network namespace each would need the server to listen on
another address.

    python scripts/machines.py --store URL --records N --batch-size B --seed S [--machines M]
                               [--kills K] [--kill-random R] [--isolate auto|yes|no] [--work DIR]

makes one chaos run: M machines (one `run`, the others `join`; 1 or 2 executors each), K seeded
kills (of a whole machine, of a machine's supervisor, of one executor, or of the driver: the
worker holding the workflow's lease), each dead machine started again with the same command,
as an operator would; with R, each machine's supervisor also makes up to R random kills of its
own (`--kill-random`). It prints one JSON line (the kills, each start of each machine and how it
ended, the problems) and exits 0 when every participant ended 0 with the import's result and
nothing of a dead machine outlived it, 1 otherwise. The invariants are scripts/audit.py's to
check, from the database.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg

from store import failpoints
from workflow.pool import die_with_parent

REPO = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 5.0  # what is left of a dead machine must be gone by then (PR_SET_PDEATHSIG)
POLL_S = 0.05
KINDS = ("machine", "supervisor", "executor", "driver")
_OWNER = re.compile(r".* pid (\d+) \([^:)]*:(\d+)\) \w+")  # store/owners.py's format


@functools.cache
def isolation_available() -> bool:
    """Whether machines can have pid namespaces of their own (`unshare --pid` needs root)."""
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run([*_UNSHARE, "true"], capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


# A pid namespace and its /proc; `sh` is the namespace's init, which reaps its orphans and ends
# (taking the namespace with it) when the supervisor does.
_UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
_INIT = ["sh", "-c", '"$@" & wait $!', "sh"]


def machine_env(points: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """A machine's environment: this checkout importable, no failpoints armed but `points`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(failpoints.environment(points or []))
    return env


def slow_batches(batches: int, seconds: float) -> list[dict[str, Any]]:
    """Failpoints that make every batch linger `seconds` halfway through its rows, inside its
    transaction: the import lasts long enough for kills to land in it, mostly mid-batch."""
    if seconds <= 0:
        return []
    linger = [failpoints.entry(failpoints.BATCH_MID, failpoints.batch_mid_key(b), "delay")
              for b in range(batches)]
    return [{**entry, "seconds": seconds} for entry in linger]


def pace(batches: int, executors: int, seconds: float) -> float:
    """The linger per batch that makes an import of `batches` on `executors` last about
    `seconds` without kills (at most half a second a batch)."""
    return round(min(0.5, seconds * executors / max(1, batches)), 3)


def run_command(url: str, state_dir: Path, records: int, batch_size: int, workers: int,
                *extra: str) -> list[str]:
    """`python -m supervisor run` of a synthetic import in the database at `url`."""
    return [sys.executable, "-m", "supervisor", "run", "--store", url, "--records", str(records),
            "--batch-size", str(batch_size), "--workers", str(workers), "--state-dir", str(state_dir),
            "--json", *extra]


def join_command(url: str, state_dir: Path, root: str, workers: int, *extra: str) -> list[str]:
    """`python -m supervisor join` of the workflow `root` in the database at `url`."""
    return [sys.executable, "-m", "supervisor", "join", "--store", url, "--id", root,
            "--workers", str(workers), "--state-dir", str(state_dir), "--json", *extra]


def synthetic_root(records: int) -> str:
    return f"import/synthetic-{records}"


@dataclass
class Life:
    """One start of a machine's command, to its end."""

    process: subprocess.Popen[bytes]
    out: Path
    err: Path
    killed: str | None = None  # the kind of kill of ours that ended it

    @property
    def sid(self) -> int:
        return self.process.pid  # a session leader's pid is its session's id

    @property
    def ended(self) -> bool:
        return self.process.poll() is not None

    def report(self) -> dict[str, Any] | None:
        """The supervisor's JSON report (its last line on stdout), if it printed one."""
        lines = [line for line in self.out.read_text().splitlines() if line.strip()]
        try:
            report = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            return None
        return report if isinstance(report, dict) else None

    def describe(self) -> dict[str, Any]:
        report = self.report() or {}
        return {"pid": self.process.pid, "exit": self.process.returncode, "killed": self.killed,
                "ok": report.get("ok"), "error": report.get("error"),
                "totals": {k: report.get(k) for k in ("total_records", "total_processed", "total_skipped")},
                "supervisor_kills": [k.get("kind") for k in report.get("kills", [])]}


class Machine:
    """One machine: a command started (and started again) in a session of its own, in its
    own directory (`home`), optionally in a pid namespace of its own."""

    def __init__(self, name: str, command: list[str], home: Path, env: dict[str, str], isolated: bool):
        self.name = name
        self.command = command
        self.home = home
        self.env = env
        self.isolated = isolated
        self.lives: list[Life] = []
        home.mkdir(parents=True, exist_ok=True)

    @property
    def life(self) -> Life | None:
        return self.lives[-1] if self.lives else None

    @property
    def running(self) -> bool:
        return self.life is not None and not self.life.ended

    def start(self) -> None:
        n = len(self.lives) + 1
        out, err = self.home / f"start-{n}.stdout", self.home / f"start-{n}.stderr"
        wrapped = [*_UNSHARE, *_INIT, *self.command] if self.isolated else self.command
        parent = os.getpid()
        with out.open("wb") as stdout, err.open("wb") as stderr:  # a machine dies with its operator
            process = subprocess.Popen(wrapped, cwd=self.home, env=self.env, stdin=subprocess.DEVNULL,
                                       stdout=stdout, stderr=stderr, start_new_session=True,
                                       preexec_fn=lambda: die_with_parent(parent))
        self.lives.append(Life(process, out, err))

    def processes(self, life: Life | None = None) -> list[psutil.Process]:
        """The live processes of a start of the machine (the last by default): its session."""
        life = life or self.life
        return [] if life is None else _session(life.sid)

    def executors(self) -> list[psutil.Process]:
        return [p for p in self.processes() if _cmd(p)[1:4] == ["-m", "workflow", "execute"]]

    def supervisor(self) -> psutil.Process | None:
        return next((p for p in self.processes() if _cmd(p)[1:3] == ["-m", "supervisor"]), None)

    def holder(self, owner: str) -> psutil.Process | None:
        """The process of this machine that a lease or claim `owner` names, if it runs."""
        named = named_by(owner)
        for p in self.processes():
            with contextlib.suppress(OSError):
                if named is not None and identity(p.pid) == named:
                    return p
        return None

    def kill(self, kind: str = "machine") -> None:
        """SIGKILL the whole machine at once: its session's process group, then every process
        left in its session."""
        life = self.life
        if life is None or life.ended:
            return
        life.killed = kind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(life.sid, signal.SIGKILL)
        for p in self.processes(life):
            with contextlib.suppress(psutil.Error):
                p.kill()
        life.process.wait()

    def kill_supervisor(self) -> bool:
        """SIGKILL the machine's supervisor alone: the rest must die with it."""
        sup = self.supervisor()
        if sup is None:
            return False
        self.life.killed = "supervisor"
        with contextlib.suppress(psutil.Error):
            sup.kill()
        return True

    def leftovers(self, within: float = GONE_WITHIN_S) -> list[psutil.Process]:
        """Processes of this machine's ended starts that still run after `within` seconds
        (SIGKILLed then, so that nothing outlives a test)."""
        deadline = time.monotonic() + within
        while True:
            left = [p for life in self.lives if life.ended for p in self.processes(life)]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        return left

    def wait(self, timeout: float) -> int | None:
        """The last start's exit status, once it ends within `timeout` seconds (else None)."""
        try:
            return self.life.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "command": " ".join(self.command[1:]),
                "starts": [life.describe() for life in self.lives]}


def _session(sid: int) -> list[psutil.Process]:
    """The processes of session `sid` that still run code (not zombies)."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def _cmd(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def identity(pid: int) -> tuple[int, int]:
    """(its pid in its own pid namespace, that namespace) of host process `pid`: what a lease's
    or a claim's owner names a process by."""
    with open(f"/proc/{pid}/status") as f:
        inside = next((int(line.split()[-1]) for line in f if line.startswith("NSpid:")), pid)
    return inside, os.stat(f"/proc/{pid}/ns/pid").st_ino


def named_by(owner: str) -> tuple[int, int] | None:
    """The (pid, pid namespace) that a lease's or a claim's owner names."""
    match = _OWNER.fullmatch(owner)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


@contextlib.contextmanager
def machines_cleaned_up(machines: list[Machine]) -> Iterator[list[Machine]]:
    """Every machine SIGKILLed on the way out, whatever happened: nothing outlives the run."""
    try:
        yield machines
    finally:
        for m in machines:
            m.kill("cleanup")
            m.leftovers(within=1.0)


# -- reading the database ------------------------------------------------------------------------


class Database:
    """The run's few reads of the shared database (autocommit, one connection)."""

    def __init__(self, url: str) -> None:
        self._db = psycopg.connect(url, autocommit=True, connect_timeout=10)

    def close(self) -> None:
        self._db.close()

    def one(self, sql: str, *params: Any) -> tuple[Any, ...] | None:
        try:
            return self._db.execute(sql, params).fetchone()
        except psycopg.errors.UndefinedTable:  # nobody made the tables yet
            return None

    def committed(self, root: str) -> int:
        row = self.one("SELECT count(*) FROM batch_commits WHERE import_id = %s", root)
        return 0 if row is None else row[0]

    def lease(self, root: str) -> tuple[str, int] | None:
        """(owner, epoch) of the workflow's lease, while it is unexpired."""
        row = self.one("SELECT owner, epoch FROM leases WHERE root = %s AND expires_at > now()", root)
        return None if row is None else (row[0], row[1])

    def epoch(self, root: str) -> int:
        row = self.one("SELECT epoch FROM leases WHERE root = %s", root)
        return 0 if row is None else row[0]

    def started(self, root: str) -> bool:
        """Whether the workflow's first participant recorded it (others can `join` it)."""
        return self.one("SELECT 1 FROM workflows WHERE root = %s", root) is not None

    def settled(self, root: str) -> bool:
        row = self.one("SELECT state FROM promise_states WHERE id = %s", root)
        return row is not None and row[0] != "pending"


def driver(db: Database, root: str, machines: list[Machine]) -> tuple[Machine, psutil.Process] | None:
    """The machine holding the workflow's lease, and its process that holds it, if it runs."""
    lease = db.lease(root)
    if lease is None:
        return None
    for m in machines:
        holder = m.holder(lease[0])
        if holder is not None:
            return m, holder
    return None


# -- a chaos run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """One kill of a chaos run: of what, on which machine (the driver's is found when it is
    due), once which share of the batches is committed, and when a dead machine comes back."""

    kind: str
    machine: int
    at: float
    pick: float  # which executor, of those running
    back_after: float  # seconds


def draw_kills(count: int, machines: int, seed: int) -> list[Kill]:
    """`count` kills, in the order they land; the same seed draws the same kills."""
    rng = random.Random(seed)
    kills = [Kill(rng.choice(KINDS), rng.randrange(machines), rng.uniform(0.05, 0.9), rng.random(),
                  rng.uniform(0.0, 1.5)) for _ in range(count)]
    return sorted(kills, key=lambda k: k.at)


@dataclass
class ChaosRun:
    """One import on several machines under seeded kills (see the module's doc)."""

    url: str
    work: Path
    records: int
    batch_size: int
    seed: int
    machines: int = 3
    kills: int = 4
    kill_random: int = 0  # each machine's supervisor's own random kills, at most
    isolated: bool = False
    seconds: float = 6.0  # about how long the import lasts without kills
    timeout: float = 120.0
    delivered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    undelivered: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def root(self) -> str:
        return synthetic_root(self.records)

    def workers(self) -> list[int]:
        """Each machine's executors, drawn from the seed (apart from the kills' draws)."""
        rng = random.Random(f"workers {self.seed}")
        return [rng.choice((1, 2)) for _ in range(self.machines)]

    def fleet(self) -> list[Machine]:
        rng = random.Random(f"kill-random {self.seed}")
        workers = self.workers()
        batches = math.ceil(self.records / self.batch_size)
        env = machine_env(slow_batches(batches, pace(batches, sum(workers), self.seconds)))
        fleet = []
        for n, w in enumerate(workers):
            home = self.work / f"machine-{n}"
            own = ("--kill-random", str(rng.randint(0, self.kill_random)),
                   "--seed", str(rng.randrange(10**6)))
            own = own if self.kill_random else ()
            command = (run_command(self.url, home / "state", self.records, self.batch_size, w, *own) if n == 0
                       else join_command(self.url, home / "state", self.root, w, *own))
            fleet.append(Machine(f"machine-{n}", command, home, env, self.isolated))
        return fleet

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        db = Database(self.url)
        try:
            with machines_cleaned_up(self.fleet()) as fleet:
                self._run(db, fleet)
                for m in fleet:
                    self.problems += [f"{m.name}: process {p.pid} ({' '.join(_cmd(p)[1:4])}) outlived "
                                      "its machine" for p in m.leftovers()]
                self._check_ends(fleet)
                epoch = db.epoch(self.root)
                machines = [m.describe() for m in fleet]
        finally:
            db.close()
        kills_by_supervisors = sum(len(s["supervisor_kills"]) for m in machines for s in m["starts"])
        return {"ok": not self.problems, "id": self.root, "isolated": self.isolated,
                "executors": sum(self.workers()), "kills": self.delivered, "undelivered": self.undelivered,
                "kills_by_supervisors": kills_by_supervisors, "lease_epochs": epoch,
                "machines": machines, "problems": self.problems,
                "elapsed_s": round(time.monotonic() - started, 2)}

    def _run(self, db: Database, fleet: list[Machine]) -> None:
        deadline = time.monotonic() + self.timeout
        first, *others = fleet
        first.start()
        while not db.started(self.root):  # `join` refuses a workflow not started yet
            if first.life.ended or time.monotonic() >= deadline:
                self.problems.append(f"{first.name} never started the import "
                                     f"(exit {first.life.process.poll()})")
                return
            time.sleep(POLL_S)
        for m in others:
            m.start()
        batches = math.ceil(self.records / self.batch_size)
        plan = draw_kills(self.kills, len(fleet), self.seed)
        back: dict[int, float] = {}  # machine -> when it is started again
        while any(m.running for m in fleet) or back:
            now = time.monotonic()
            if now >= deadline:
                self.problems.append(f"not finished after {self.timeout:g} s (a hang?): "
                                     f"{db.committed(self.root)} of {batches} batches committed")
                return
            for n, at in list(back.items()):
                if now >= at:
                    del back[n]
                    fleet[n].start()
            if plan and db.committed(self.root) >= plan[0].at * batches:
                kill = plan.pop(0)
                self._deliver(kill, db, fleet, back)
            time.sleep(POLL_S)
        self.undelivered += [f"{k.kind} at {k.at:.0%}: the import finished first" for k in plan]

    def _deliver(self, kill: Kill, db: Database, fleet: list[Machine], back: dict[int, float]) -> None:
        target = fleet[kill.machine]
        if kill.kind == "driver":
            found = driver(db, self.root, fleet)
            if found is None:
                self.undelivered.append(f"driver at {kill.at:.0%}: no live process holds the lease")
                return
            target, process = found
            with contextlib.suppress(psutil.Error):
                process.kill()
        elif not target.running:
            self.undelivered.append(f"{kill.kind} at {kill.at:.0%}: {target.name} is down")
            return
        elif kill.kind == "machine":
            target.kill()
            back[kill.machine] = time.monotonic() + kill.back_after
        elif kill.kind == "supervisor":
            if not target.kill_supervisor():
                self.undelivered.append(f"supervisor at {kill.at:.0%}: {target.name} has none running")
                return
            target.wait(GONE_WITHIN_S)
            back[kill.machine] = time.monotonic() + kill.back_after
        else:
            executors = sorted(target.executors(), key=lambda p: p.pid)
            if not executors:
                self.undelivered.append(f"executor at {kill.at:.0%}: {target.name} has none running")
                return
            with contextlib.suppress(psutil.Error):
                executors[min(len(executors) - 1, int(kill.pick * len(executors)))].kill()
        self.delivered[kill.kind] += 1

    def _check_ends(self, fleet: list[Machine]) -> None:
        """Every machine's last start ended 0 with the import's result."""
        for m in fleet:
            life = m.life
            if life is None:
                continue
            report = life.report() or {}
            if life.process.returncode != 0 or report.get("ok") is not True:
                tail = life.err.read_text(errors="replace").strip().splitlines()[-3:]
                self.problems.append(f"{m.name} ended {life.process.returncode} "
                                     f"({report.get('error') or 'no report'}); stderr ends: {tail}")
            elif report.get("total_records") != self.records:
                self.problems.append(f"{m.name} reports {report.get('total_records')} records, "
                                     f"not {self.records}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="the run's database (postgresql://...), empty")
    p.add_argument("--records", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--machines", type=int, default=3, choices=(2, 3, 4))
    p.add_argument("--kills", type=int, default=4)
    p.add_argument("--kill-random", type=int, default=0)
    p.add_argument("--seconds", type=float, default=6.0, help="about how long the import lasts unkilled")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="a pid namespace per machine (auto: where unshare works)")
    p.add_argument("--work", type=Path, default=None, help="the machines' directories (default: a temp dir)")
    args = p.parse_args(argv)
    isolated = isolation_available() if args.isolate == "auto" else args.isolate == "yes"
    if isolated and not isolation_available():
        p.error("--isolate yes: `unshare --pid --fork --mount-proc` does not work here (run as root)")
    work = args.work or Path(tempfile.mkdtemp(prefix="machines."))
    try:
        result = ChaosRun(args.store, work, args.records, args.batch_size, args.seed, machines=args.machines,
                          kills=args.kills, kill_random=args.kill_random, isolated=isolated,
                          seconds=args.seconds, timeout=args.timeout).run()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
