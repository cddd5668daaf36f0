"""Child process of the ownership tests: drives the root `own/slow` on a SHARED store.

Its one step appends `{"pid": ...}` to --log, announces `{"event": "in_step"}` on stdout and
sleeps --sleep seconds. At the end the child prints `{"event": "resolved", "value": ...}` or
`{"event": "error", "type": ..., "message": ...}` and exits 0 or 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Generator
from typing import Any

from store import JsonlStore, StoreError
from workflow import Context, Runner, current_step, register

ROOT_ID = "own/slow"


@register(name="own.slow_step")
def slow_step() -> int:
    settings = current_step().dependency("settings")
    with open(settings.log, "a") as log:
        log.write(json.dumps({"pid": os.getpid()}) + "\n")
    print(json.dumps({"event": "in_step", "pid": os.getpid()}), flush=True)
    time.sleep(settings.sleep)
    return os.getpid()


@register(name="own.workflow")
def workflow(ctx: Context) -> Generator[Any, Any, int]:
    return (yield ctx.run(slow_step))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--sleep", type=float, default=2.0)
    p.add_argument("--lock-timeout", type=float, default=30.0)
    p.add_argument("--exclusive", action="store_true", help="open the store exclusively")
    settings = p.parse_args()
    try:
        with JsonlStore(settings.store, lock_timeout=settings.lock_timeout,
                        exclusive=settings.exclusive) as store:
            value = Runner(store, dependencies={"settings": settings}).run(ROOT_ID, workflow)
    except StoreError as exc:
        print(json.dumps({"event": "error", "type": type(exc).__name__, "message": str(exc)}))
        return 1
    print(json.dumps({"event": "resolved", "value": value}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
