"""The display's words and numbers (supervisor/live.py), on a real stream that is no terminal."""

from __future__ import annotations

import io
import time

from supervisor.live import Display, Pace


def test_pace_says_done_of_all_the_rate_and_the_time_left() -> None:
    pace = Pace("batches", 100, started=0.0, done=13, total=10_000, new=10, restarts=1, kills=2)
    # 10 batches of 100 records in 2 s: 500 rec/s, and 9,987 batches left at 5 a second.
    assert pace.describe(2.0) == "13/10,000 batches  500 rec/s  ETA 33m17s  restarts 1  kills 2"
    assert Pace("steps", None, started=0.0, done=3, new=3).describe(2.0) == (
        "3 steps  1.5 steps/s  restarts 0  kills 0")  # no total, so no time left


def test_off_a_terminal_messages_are_plain_lines_and_progress_comes_now_and_then() -> None:
    stream = io.StringIO()
    every_minute = Display(Pace("batches", 100, started=time.monotonic()), stream, every_s=60)
    every_minute.message("supervisor: worker 1 killed by SIGKILL")
    every_minute.update(1, 10, 1, 0, 0)  # not a minute yet: no progress line
    assert stream.getvalue() == "supervisor: worker 1 killed by SIGKILL\n"

    always = Display(Pace("batches", 100, started=time.monotonic()), stream, every_s=0)
    always.update(2, 10, 2, 1, 1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("progress: 2/10 batches  "), lines
    assert lines[1].endswith("  restarts 1  kills 1"), lines
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
