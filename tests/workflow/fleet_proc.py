"""Child process of the fleet tests: a driver, or an executor, of a workflow kept in PostgreSQL.

    python fleet_proc.py drive URL ROOT LEASE_S N SLEEP
        Runs the workflow `fleet_t.steps(N, SLEEP)` with a Runner over a PgStore whose lease is
        LEASE_S seconds; the driver runs the steps itself. Ends with {"event": "result",
        "value": ...} (exit 0) or {"event": "error", "type": ..., "message": ...} (exit 3).
    python fleet_proc.py execute URL ROOT CLAIM_S LOG
        An Executor claiming ROOT's steps (claims of CLAIM_S seconds) until ROOT is settled;
        {"event": "ran", "steps": n} at the end (exit 0).

Each step announces {"event": "in_step", "id": ..., "attempt": ..., "pid": ...} on stdout as
it begins, and appends the same (with the time) to LOG, outside any transaction. The test
imports this module too: it registers the same functions, under the same names, as driver.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from store import StoreError, open_store
from workflow import Context, RetryPolicy, Runner, current_step, register


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def announce() -> dict[str, Any]:
    """This attempt, in the run's log (if it has one), then on stdout."""
    info = current_step()
    attempt = {"id": info.promise_id, "attempt": info.attempt, "pid": os.getpid(), "t": time.time()}
    log = info.dependencies.get("log")
    if log is not None:  # first: the test may kill it as soon as it has said where it is
        with open(log, "a") as f:
            f.write(json.dumps(attempt) + "\n")
    say("in_step", **attempt)
    return attempt


@register(name="fleet_t.tick")
def tick(i: int, sleep: float) -> int:
    """Busy for `sleep` seconds: a driver stopped in it goes on at once with its settle when
    continued (a sleeping one could let its lease's heartbeat run first)."""
    announce()
    end = time.monotonic() + sleep
    while time.monotonic() < end:
        pass
    return i * i


@register(name="fleet_t.steps")
def steps(ctx: Context, n: int, sleep: float) -> Generator[Any, Any, int]:
    total = 0
    for i in range(n):
        total += yield ctx.run(tick, i, sleep)
    return total


@register(name="fleet_t.scratch")
def scratch(blocked_attempts: list[int], hold: float) -> dict[str, int]:
    """Writes a row into the table `scratch` in the step's transaction, then holds it `hold`
    seconds in the attempts named (the test stops or kills it meanwhile)."""
    info = current_step()
    info.transaction.execute("INSERT INTO scratch VALUES (%s, %s, %s)",
                             (info.promise_id, info.attempt, os.getpid()))
    announce()
    if info.attempt in blocked_attempts:
        time.sleep(hold)
    return {"pid": os.getpid(), "attempt": info.attempt}


@register(name="fleet_t.flaky")
def flaky(fail_before: int) -> int:
    """Fails every attempt before `fail_before` (for ever with 0)."""
    attempt = announce()["attempt"]
    if fail_before == 0 or attempt < fail_before:
        raise RuntimeError(f"attempt {attempt} fails")
    return attempt


STEPS = {"scratch": scratch, "flaky": flaky}


@register(name="fleet_t.one")
def one(ctx: Context, step: str, args: list[Any], policy: dict[str, Any]) -> Generator[Any, Any, Any]:
    """One step of STEPS, with the retry policy `policy`."""
    return (yield ctx.run(STEPS[step], *args, retry=RetryPolicy(**policy)))


def drive(url: str, root: str, lease_s: str, n: str, sleep: str) -> int:
    try:
        with open_store(url, lease_s=float(lease_s), lock_timeout=10) as store:
            value = Runner(store).run(root, steps, int(n), float(sleep))
    except StoreError as exc:
        say("error", type=type(exc).__name__, message=str(exc))
        return 3
    say("result", value=value)
    return 0


def execute(url: str, root: str, claim_s: str, log: str) -> int:
    from workflow.fleet import Executor

    with open_store(url) as store:
        def done() -> bool:
            promise = store.get(root)
            return promise is not None and promise.settled

        ran = Executor(store, [root], {"log": Path(log)}, claim_s=float(claim_s)).run_until(done)
    say("ran", steps=ran)
    return 0


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    sys.exit({"drive": drive, "execute": execute}[mode](*rest))
