"""Child process of the crash tests: a one-step workflow whose step fails, then may block.

Attempts below --fail-before raise; the attempt numbered --block-at-attempt announces
`{"event": "blocked"}` on stdout and sleeps (to be SIGKILLed in the middle of an attempt), and
--block-in-backoff N does the same in the N-th backoff sleep (SIGKILLed between two attempts).
Every attempt appends the attempt number current_step() gives it to --log. At the end the child
prints `{"event": "resolved", "value": ...}` or `{"event": "rejected", "error": ...}`.

The step takes no arguments and reads its settings as a Runner dependency, so that runs with
other flags replay the same recorded calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from store import Durability, JsonlStore
from workflow import Context, RetryPolicy, Runner, StepError, current_step, register

ROOT_ID = "crash/flaky"
BLOCK_S = 60.0


def announce(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def block(**fields: Any) -> None:
    announce("blocked", **fields)
    time.sleep(BLOCK_S)
    sys.exit("blocked for a minute and nobody killed us")


@register(name="crash.flaky_step")
def flaky_step() -> dict[str, int]:
    step = current_step()
    settings = step.dependency("settings")
    with open(settings.log, "a") as log:
        log.write(json.dumps({"attempt": step.attempt, "pid": os.getpid()}) + "\n")
    if step.attempt == settings.block_at_attempt:
        block(attempt=step.attempt)
    if step.attempt < settings.fail_before:
        raise RuntimeError(f"planned failure of attempt {step.attempt}")
    return {"attempt": step.attempt}


@register(name="crash.flaky_workflow")
def flaky_workflow(ctx: Context) -> Generator[Any, Any, Any]:
    return (yield ctx.run(flaky_step))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--fail-before", type=int, default=1)
    p.add_argument("--block-at-attempt", type=int, default=None)
    p.add_argument("--block-in-backoff", type=int, default=None)
    p.add_argument("--max-attempts", type=int, default=10)
    settings = p.parse_args()
    sleeps = 0

    def sleep(delay: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps == settings.block_in_backoff:
            block(delay=delay)

    with JsonlStore(settings.store, exclusive=True, durability=Durability.NONE) as store:
        runner = Runner(store, retry=RetryPolicy(max_attempts=settings.max_attempts, initial=0),
                        dependencies={"settings": settings}, sleep=sleep)
        try:
            value = runner.run(ROOT_ID, flaky_workflow)
        except StepError as exc:
            announce("rejected", error=exc.error)
            return 4
    announce("resolved", value=value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
