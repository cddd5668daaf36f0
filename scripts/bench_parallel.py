"""The parallel-batches rows of scripts/bench.py: group commit and the import with a pool."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from store import JsonlStore
from workflow import Runner, register

REPO = Path(__file__).resolve().parent.parent


@register(name="bench.trivial")
def trivial(i: int) -> int:
    return i


@register(name="bench.mapped")
def mapped(ctx: Any, n: int, concurrency: int) -> Any:
    return len((yield ctx.map(trivial, range(n), concurrency=concurrency)))


@register(name="bench.sequential")
def sequential(ctx: Any, n: int) -> Any:
    for i in range(n):
        yield ctx.run(trivial, i)
    return n


def group_commit(scratch_dir: Path, n: int, concurrency: int = 16) -> dict[str, float]:
    """n trivial durable steps: `ctx.map(concurrency=16)` (settles share a sync) vs `ctx.run`."""
    seconds = {}
    for name, fn, args in (("sequential", sequential, (n,)), ("mapped", mapped, (n, concurrency))):
        path = scratch_dir / f"{name}.jsonl"
        with JsonlStore(path, exclusive=True) as store:
            start = time.perf_counter()
            Runner(store).run(f"bench-{name}", fn, *args)
            seconds[name] = time.perf_counter() - start
    return {"steps": n, "concurrency": concurrency, "sequential_s": seconds["sequential"],
            "map_s": seconds["mapped"], "group_commit_speedup": seconds["sequential"] / seconds["mapped"]}


IMPORT_BATCH_SIZE = 1000  # as the other import rows: a batch is a transaction of 1,000 rows


def supervised_import_s(state_dir: Path, records: int, workers: int) -> float:
    """Wall seconds of `python -m supervisor run --records N --workers W` to its end."""
    command = [sys.executable, "-m", "supervisor", "run", "--records", str(records),
               "--batch-size", str(IMPORT_BATCH_SIZE), "--workers", str(workers),
               "--state-dir", str(state_dir), "--json"]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def import_speedup(scratch_dir: Path, records: int) -> dict[str, float]:
    """The same synthetic import with one worker and with two, alternated; the best of two each."""
    best: dict[int, float] = {}
    for round_ in range(2):
        for workers in (1, 2):
            seconds = supervised_import_s(scratch_dir / f"w{workers}-{round_}", records, workers)
            best[workers] = min(best.get(workers, seconds), seconds)
    return {"records": records, "workers1_s": best[1], "workers2_s": best[2],
            "import_speedup_workers2": best[1] / best[2]}
