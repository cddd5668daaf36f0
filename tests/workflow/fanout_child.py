"""Child process of the fan-out crash tests: a driver with a pool of step processes, to SIGKILL.

Runs `fan.crash_squares(n, concurrency)`, a ctx.map of `fan.crash_square` over range(n), on the
JSON-lines store --store (exclusive, fdatasync'ed) with --workers step processes, then prints
`{"event": "result", "value": [...]}` on stdout. Every step attempt appends `{"id", "attempt",
"pid"}` to --log, then announces `{"event": "in_step", "id", "item", "attempt", "pid", "ppid"}` on
the inherited fd --announce-fd. Attempts of the items listed in --hold (only attempt
--hold-attempt, if given) block there, to be killed; the others return the item's square. The
hold is a dependency, not an argument, so runs with other flags replay the same recorded calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Generator
from typing import Any

from store import JsonlStore
from workflow import Context, RetryPolicy, Runner, current_step, register

ROOT_ID = "crash/fan"
BLOCK_S = 60.0


@register(name="fan.crash_square")
def crash_square(i: int) -> int:
    step = current_step()
    settings = step.dependency("settings")
    with open(settings.log, "a") as log:
        log.write(json.dumps({"id": step.promise_id, "attempt": step.attempt, "pid": os.getpid()}) + "\n")
    line = json.dumps({"event": "in_step", "id": step.promise_id, "item": i, "attempt": step.attempt,
                       "pid": os.getpid(), "ppid": os.getppid()})
    os.write(settings.announce_fd, line.encode() + b"\n")
    if i in settings.hold and settings.hold_attempt in (None, step.attempt):
        time.sleep(BLOCK_S)
        raise RuntimeError(f"item {i} held for {BLOCK_S} s and nobody killed its process")
    return i * i


@register(name="fan.crash_squares")
def crash_squares(ctx: Context, n: int, concurrency: int) -> Generator[Any, Any, list[int]]:
    return (yield ctx.map(crash_square, range(n), concurrency=concurrency))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--announce-fd", type=int, required=True)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--hold", type=lambda s: {int(i) for i in s.split(",") if i}, default=set())
    p.add_argument("--hold-attempt", type=int, default=None)
    settings = p.parse_args()
    with JsonlStore(settings.store, exclusive=True) as store:
        runner = Runner(store, retry=RetryPolicy(max_attempts=5, initial=0),
                        dependencies={"settings": settings}, workers=settings.workers)
        value = runner.run(ROOT_ID, crash_squares, settings.items, settings.concurrency)
    print(json.dumps({"event": "result", "value": value}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
