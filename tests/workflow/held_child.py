"""Child process of the held-settle crash tests: a chain of steps on a PostgreSQL store.

`python held_child.py URL LOG N [THINK_S]` runs (or resumes) the root `held/chain`: N steps one
after the other, step i taking the value of step i-1 (so a replay that met another value would
be a non-determinism error) and appending `{"step": i, "pid": ...}` to LOG before it returns;
after each step the workflow's own code computes for THINK_S seconds (default 0). At the end it
prints the root's value and exits 0. A library user's loop: each step's settle is held back and
written with the next step's creation (store/pg.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Generator
from typing import Any

from store import open_store
from workflow import Context, Runner, current_step, register

ROOT_ID = "held/chain"


@register(name="held.link")
def link(i: int, before: int) -> int:
    with open(current_step().dependency("log"), "a") as log:
        log.write(json.dumps({"step": i, "pid": os.getpid()}) + "\n")
    return before * 31 % 1_000_003 + i


@register(name="held.chain")
def chain(ctx: Context, n: int, think_s: float = 0.0) -> Generator[Any, Any, int]:
    value = 1
    for i in range(n):
        value = yield ctx.run(link, i, value)
        busy_until = time.monotonic() + think_s
        while time.monotonic() < busy_until:  # the workflow's own code, between its steps
            pass
    return value


def main() -> int:
    url, log, n, *think = sys.argv[1:]
    with open_store(url, lock_timeout=30) as store:
        runner = Runner(store, dependencies={"log": log})
        print(json.dumps(runner.run(ROOT_ID, chain, int(n), *map(float, think))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
