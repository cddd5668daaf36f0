"""Child process of the PostgreSQL fencing tests: takes the lease of one root workflow.

`python pg_lease_child.py URL ROOT LEASE_S MODE` opens a PgStore with that lease, owns ROOT and
announces `{"event": "owned", "pid": ...}` on stdout. In MODE `hold` it then only holds the
lease (its heartbeat renews it); in MODE `write` it creates, starts and resolves `ROOT.<n>`
(n = 0, 1, ...) one after the other, as fast as it can, and announces `{"event": "wrote",
"n": n}` after each of the first six. A store failure is announced as `{"event": "error",
"type": ..., "message": ..., "wrote": n}` (the last n written): exit 3.
"""

from __future__ import annotations

import json
import os
import sys
import time

from store import StoreError, open_store


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> int:
    url, root, lease_s, mode = sys.argv[1:]
    try:
        with open_store(url, lease_s=float(lease_s), lock_timeout=10) as store, store.own(root):
            say("owned", pid=os.getpid())
            n = 0
            while True:
                if mode == "hold":
                    time.sleep(0.05)
                    continue
                promise_id = f"{root}.{n}"
                store.create(promise_id, {"n": n})
                store.start_attempt(promise_id)
                store.resolve(promise_id, n)
                if n <= 5:
                    say("wrote", n=n)
                n += 1  # at once: stopped, it is most likely in a write, which it goes on with
    except StoreError as exc:
        say("error", type=type(exc).__name__, message=str(exc), wrote=n - 1)
        return 3


if __name__ == "__main__":
    sys.exit(main())
