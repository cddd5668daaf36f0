"""What a supervised run reports: per child, per kill, and the import's stored result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ChildReport:
    pid: int
    exit: str  # "exit code N" or "killed by SIGNAME"
    executed: list[int] = field(default_factory=list)  # batches this child completed
    replayed: int = 0  # batches it found completed and did not run
    error: str | None = None


@dataclass
class KillReport:
    pid: int
    kind: str  # "kill-at-batch", "timed", "store-write"
    batch: int | None


@dataclass
class StallReport:
    """A worker killed for silence (hung: stopped, or stuck in C code): not one of our kills."""

    pid: int
    batch: int | None  # the batch in flight, if any
    silent_s: float  # how long its progress pipe had been silent
    kind: str = "stall"


@dataclass
class RunReport:
    id: str
    state_dir: str
    restarts: int = 0
    kills: list[KillReport] = field(default_factory=list)
    stalls: list[StallReport] = field(default_factory=list)
    undelivered_kills: list[str] = field(default_factory=list)
    children: list[ChildReport] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str | None = None
    interrupted_by: str | None = None  # SIGINT or SIGTERM, when the run was stopped
    elapsed_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "ok": self.result is not None}
        if self.result is not None:
            out.update({k: v for k, v in self.result.items() if k != "batches"})
        out.update(
            restarts=self.restarts,
            kills=[asdict(k) for k in self.kills],
            stalls=[asdict(s) for s in self.stalls],
            undelivered_kills=self.undelivered_kills,
            children=[asdict(c) for c in self.children],
            error=self.error,
            elapsed_s=round(self.elapsed_s, 3),
            state_dir=self.state_dir,
        )
        return out

    def as_text(self) -> str:
        lines = [f"import {self.id} ({self.state_dir})"]
        for c in self.children:
            lines.append(
                f"  worker {c.pid}: {c.exit}; ran {len(c.executed)} batch(es)"
                f"{' ' + _ranges(c.executed) if c.executed else ''}, replayed {c.replayed}"
            )
        for k in self.kills:
            where = f" during batch {k.batch}" if k.batch is not None else ""
            lines.append(f"  SIGKILL ({k.kind}) to worker {k.pid}{where}")
        for s in self.stalls:
            where = f"during batch {s.batch}" if s.batch is not None else "outside any batch"
            lines.append(f"  worker {s.pid} stalled {where}: nothing on its progress pipe for "
                         f"{s.silent_s:.1f} s; SIGKILLed and restarted")
        lines.extend(f"  kill not delivered: {u}" for u in self.undelivered_kills)
        if self.result is not None:
            r = self.result
            reasons = ", ".join(f"{k} {v}" for k, v in r["skipped_reasons"].items()) or "none"
            lines.append(
                f"done: {r['total_records']} records in {r['batch_count']} batches: "
                f"{r['total_processed']} imported, {r['total_skipped']} skipped ({reasons}); "
                f"{self.restarts} restart(s), {len(self.kills)} kill(s), {len(self.stalls)} stall(s), "
                f"{self.elapsed_s:.2f} s"
            )
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)


def _ranges(batches: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    parts: list[list[int]] = []
    for b in sorted(batches):
        if parts and parts[-1][1] == b - 1:
            parts[-1][1] = b
        else:
            parts.append([b, b])
    return ",".join(f"{a}-{z}" if a != z else f"{a}" for a, z in parts)
