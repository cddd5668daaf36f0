"""What a supervised run reports: per child, per kill, and the workflow's stored result.

The words are a `Terms`: a workflow's "steps" by default; an application's wiring may bring its
own (the import calls its steps batches, counts only its batch steps among its plan steps, and
summarizes its result). Reports number the units among themselves: the import's batch 5 is
its sixth `process_batch` call, whatever its position among the root's calls.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from workflow.history import History

from .location import StoreLocation

RESULT_TEXT_CHARS = 200  # a result longer than this is cut in the text report (never in JSON)


@dataclass(frozen=True)
class Terms:
    """How reports name a workflow and its direct steps, and show its result."""

    noun: str = "workflow"
    unit: str = "step"
    units: str = "steps"
    units_maybe: str = "step(s)"
    command: str = "exec"  # the supervisor command that runs it
    unit_fn: str | None = None  # the registered name whose calls are the units (None: every step)

    def counts(self, fn: str | None) -> bool:
        """Whether a direct step calling the registered name `fn` is one of the units."""
        return self.unit_fn is None or fn == self.unit_fn

    def units_of(self, history: History) -> History:
        """The workflow's history with only its units among its direct steps."""
        return history.of(self.unit_fn)

    def result_fields(self, result: Any) -> dict[str, Any]:
        """The result's keys in a JSON report (`result` is None when the run did not finish)."""
        return {"result": result}

    def summary(self, result: Any) -> Any:
        """The result as `status` shows it."""
        return result

    def result_text(self, result: Any) -> str:
        """The result in one line of a text report."""
        text = orjson.dumps(result).decode()
        if len(text) > RESULT_TEXT_CHARS:
            text = text[:RESULT_TEXT_CHARS] + f"... ({len(text)} characters; --json shows it all)"
        return text

    def failure_text(self, error: str, retry: str) -> str:
        """The one line a failed run ends with: its error, and how to go on once the cause is
        fixed (`retry`: the command that reopens it)."""
        return f"{error}; fix the cause, then `{retry}` and run the same command again to resume"

    def unretryable(self, error: str) -> str | None:
        """Why a failure with this error (`type: message`) is one no `retry` can resume, saying
        itself what to do instead; None if a retry may."""
        return None

    def step_count(self, history: History) -> int | None:
        """How many units the workflow has in all; None while only its run can tell."""
        return None

    def records_done(self, history: History) -> int | None:
        """How many records its finished units handled, for a workflow that counts records."""
        return None

    def executions(self, location: StoreLocation, root_id: str) -> list[dict[str, Any]]:
        """What the application recorded of each run of a unit (`promise_id`, `pid`, `attempt`,
        `started_at`, `finished_at`, `outcome`), in the order they started; none by default."""
        return []


@dataclass
class ChildReport:
    pid: int
    exit: str  # "exit code N" or "killed by SIGNAME"
    executed: list[int] = field(default_factory=list)  # steps this child completed
    replayed: int = 0  # steps it found completed and did not run
    error: str | None = None


@dataclass
class KillReport:
    pid: int  # the worker; for a pool kill, the pool process
    kind: str  # "kill-at-<unit>", "timed", "store-write", "pool"
    step: int | None  # for a pool kill, known once the worker runs that step again
    worker: int | None = None  # a pool kill: the worker whose pool process it was

    def as_json(self, unit: str) -> dict[str, Any]:
        out = {"pid": self.pid, "kind": self.kind, unit: self.step}
        if self.worker is not None:
            out["worker"] = self.worker
        return out


@dataclass
class StallReport:
    """A worker killed for silence (hung: stopped, or stuck in C code): not one of our kills."""

    pid: int
    step: int | None  # the step in flight, if any
    silent_s: float  # how long its progress pipe had been silent
    kind: str = "stall"


@dataclass
class RunReport:
    id: str
    where: tuple[str, str]  # ("state_dir", DIR) or ("store", URL)
    terms: Terms = field(default_factory=Terms)
    ok: bool = False  # the workflow finished and its result is stored
    restarts: int = 0
    kills: list[KillReport] = field(default_factory=list)
    stalls: list[StallReport] = field(default_factory=list)
    undelivered_kills: list[str] = field(default_factory=list)
    children: list[ChildReport] = field(default_factory=list)
    result: Any = None
    error: str | None = None
    interrupted_by: str | None = None  # SIGINT or SIGTERM, when the run was stopped
    busy: bool = False  # another process held the store or drove the workflow
    cancelled: bool = False  # the workflow is cancelled (`cancel`): its own end, not an error
    resume: str | None = None  # the command that resumes a cancelled workflow
    elapsed_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        unit = self.terms.unit
        out: dict[str, Any] = {"id": self.id, "ok": self.ok}
        out.update(self.terms.result_fields(self.result if self.ok else None))
        out.update(
            restarts=self.restarts,
            kills=[k.as_json(unit) for k in self.kills],
            stalls=[{"pid": s.pid, unit: s.step, "silent_s": s.silent_s, "kind": s.kind}
                    for s in self.stalls],
            undelivered_kills=self.undelivered_kills,
            children=[asdict(c) for c in self.children],
            error=self.error,
            cancelled=self.cancelled,
            elapsed_s=round(self.elapsed_s, 3),
        )
        if self.cancelled:
            out["resume"] = self.resume
        out[self.where[0]] = self.where[1]
        return out

    def as_text(self) -> str:
        t = self.terms
        lines = [f"{t.noun} {self.id} ({self.where[1]})"]
        explained = False  # what "replayed" means, said once, where it first appears
        for c in self.children:
            replayed = f"replayed {c.replayed}"
            if c.replayed and not explained:
                replayed += " (finished before this worker started; not run again)"
                explained = True
            lines.append(
                f"  worker {c.pid}: {c.exit}; ran {len(c.executed)} {t.units_maybe}"
                f"{' ' + ranges(c.executed) if c.executed else ''}, {replayed}"
            )
        for k in self.kills:
            where = f" during {t.unit} {k.step}" if k.step is not None else ""
            whom = f"pool process {k.pid} of worker {k.worker}" if k.worker else f"worker {k.pid}"
            lines.append(f"  SIGKILL ({k.kind}) to {whom}{where}")
        for s in self.stalls:
            where = f"during {t.unit} {s.step}" if s.step is not None else f"outside any {t.unit}"
            lines.append(f"  worker {s.pid} stalled {where}: nothing on its progress pipe for "
                         f"{s.silent_s:.1f} s; SIGKILLed and restarted")
        for why, count in Counter(self.undelivered_kills).items():  # alike ones in one line
            lines.append(f"  kill not delivered: {why}" if count == 1
                         else f"  {count} kills not delivered: {why}")
        counts = (f"{self.restarts} restart(s), {len(self.kills)} kill(s), {len(self.stalls)} stall(s), "
                  f"{self.elapsed_s:.2f} s")
        if self.ok:
            lines.append(f"done: {t.result_text(self.result)}; {counts}")
        elif self.cancelled:
            lines.append(f"cancelled: {t.noun} {self.id} is cancelled; `{self.resume}` resumes it "
                         f"(then run the same command again); {counts}")
        else:  # the error itself is printed once, as the `error:` line on stderr
            lines.append(f"not done: {counts}; why: the error line on stderr")
        return "\n".join(lines)


def ranges(steps: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    parts: list[list[int]] = []
    for b in sorted(steps):
        if parts and parts[-1][1] == b - 1:
            parts[-1][1] = b
        else:
            parts.append([b, b])
    return ",".join(f"{a}-{z}" if a != z else f"{a}" for a, z in parts)
