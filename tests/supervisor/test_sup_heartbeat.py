"""The worker's progress pipe carries whole lines, whatever its heartbeat thread writes beside
the main thread: a step event longer than PIPE_BUF is never cut by a heartbeat."""

from __future__ import annotations

import subprocess
import sys

import orjson
from supervisor_helpers import child_env

LONG_ERROR_CHARS = 200_000  # far beyond PIPE_BUF (4 KiB) and a pipe's own buffer (64 KiB)
EVENTS = 40

# A process whose progress fd is its stdout (a pipe): long events from the main thread while
# the heartbeat thread beats every half millisecond.
WRITER = f"""
from workflow.progress import Progress

progress = Progress(1, "import/x")
progress.start_heartbeat(0.0005)
for i in range({EVENTS}):
    progress.send("ended", pid=i, error="x" * {LONG_ERROR_CHARS})
"""


def test_long_events_and_fast_heartbeats_never_interleave() -> None:
    proc = subprocess.run([sys.executable, "-c", WRITER], capture_output=True, env=child_env(),
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]

    events = [orjson.loads(line) for line in proc.stdout.splitlines()]
    long_ones = [e for e in events if e["event"] == "ended"]
    assert [e["pid"] for e in long_ones] == list(range(EVENTS))
    assert all(e["error"] == "x" * LONG_ERROR_CHARS for e in long_ones)
    assert {e["event"] for e in events} == {"ended", "heartbeat"}
    assert len(events) > EVENTS  # heartbeats did run beside the long writes
