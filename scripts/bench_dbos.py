"""The DBOS peer of scripts/bench.py: the same workflow of n trivial steps on DBOS 3.4, with the
system database the caller names (SQLite or PostgreSQL). Each run is a child process of its own,
since DBOS is set up once per process.

    python scripts/bench_dbos.py N SYSTEM_DATABASE_URL    # prints {"us_per_step": ...}
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time


def installed() -> bool:
    """Whether DBOS can be imported (`pip install -e '.[bench]'`)."""
    return importlib.util.find_spec("dbos") is not None


def us_per_step(system_database_url: str, n: int) -> float:
    """µs per step of a DBOS workflow of n trivial steps, after a warm-up, in a child process."""
    out = subprocess.run([sys.executable, __file__, str(n), system_database_url],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["us_per_step"]


def child(system_database_url: str, n: int) -> dict[str, float]:
    from dbos import DBOS

    DBOS(config={"name": "bench", "system_database_url": system_database_url})

    @DBOS.step()
    def dbos_noop(i: int) -> int:
        return i

    @DBOS.workflow()
    def dbos_steps(k: int) -> int:
        for i in range(k):
            dbos_noop(i)
        return k

    DBOS.launch()
    dbos_steps(10)  # warm up
    start = time.perf_counter()
    dbos_steps(n)
    seconds = time.perf_counter() - start
    DBOS.destroy()
    return {"us_per_step": seconds / n * 1e6}


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[2], int(sys.argv[1]))))
