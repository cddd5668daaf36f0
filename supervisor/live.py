"""What the person running a supervised workflow sees on stderr while it runs.

On a terminal: a live display at the bottom (rich: a bar, units done of all, records/s, ETA,
restarts, kills), and every message (the supervisor's log, the worker's lines) printed above
it, never into it: one writer owns the terminal, so a message and the progress never share a
line. Anywhere else (a file, a pipe, CI): no carriage return, no escape code, one plain line per
event, and a plain progress line now and then.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

PLAIN_PROGRESS_EVERY_S = 10.0  # off a terminal, a progress line at most this often


@dataclass
class Pace:
    """How fast the units go in this run: units done (all, and new in this run) since `started`."""

    units: str  # "batches"
    unit_records: int | None  # records per unit (the batch size), for a rate in records/s
    started: float
    done: int = 0
    total: int | None = None
    new: int = 0  # done by this run's workers, not replayed
    restarts: int = 0
    kills: int = 0

    def rate(self, now: float) -> str:
        """'1,234 rec/s' (or 'batches/s' without a record count per unit)."""
        per_s = self.new / max(now - self.started, 1e-6)
        if self.unit_records is None:
            return f"{per_s:,.1f} {self.units}/s"
        return f"{per_s * self.unit_records:,.0f} rec/s"

    def eta(self, now: float) -> str | None:
        """Time left at this run's pace ('1m05s', '7s'); None while the total or the pace is
        not known."""
        if self.total is None or self.new == 0:
            return None
        left = (self.total - self.done) * (now - self.started) / self.new
        minutes, seconds = divmod(round(left), 60)
        return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"

    def describe(self, now: float) -> str:
        done = f"{self.done:,}" if self.total is None else f"{self.done:,}/{self.total:,}"
        eta = self.eta(now)
        return (f"{done} {self.units}  {self.rate(now)}{f'  ETA {eta}' if eta else ''}  "
                f"restarts {self.restarts}  kills {self.kills}")


class Display:
    """Plain lines on a stream: the non-terminal display (and the base of the live one)."""

    def __init__(self, pace: Pace, stream: TextIO, every_s: float = PLAIN_PROGRESS_EVERY_S) -> None:
        self.pace = pace
        self._stream = stream
        self._every_s = every_s  # a progress line at most this often
        self._shown_at = pace.started

    def message(self, text: str) -> None:
        """One line for a person: a log record, a line of the worker's."""
        print(text, file=self._stream, flush=True)

    def update(self, done: int, total: int | None, new: int, restarts: int, kills: int) -> None:
        """`done` units of `total` (None: not known yet), `new` of them run in this run."""
        p = self.pace
        p.done, p.total, p.new, p.restarts, p.kills = done, total, new, restarts, kills
        self._show()

    def _show(self) -> None:
        now = time.monotonic()
        if now - self._shown_at >= self._every_s:
            self._shown_at = now
            self.message(f"progress: {self.pace.describe(now)}")

    def close(self) -> None:
        pass


class LiveDisplay(Display):
    """The terminal's display: rich draws the progress at the bottom and prints messages above."""

    def __init__(self, pace: Pace, stream: TextIO) -> None:
        super().__init__(pace, stream)
        self._progress = Progress(
            BarColumn(bar_width=None), TextColumn("{task.description}"),
            console=Console(file=stream), expand=True, refresh_per_second=4,
            redirect_stdout=False, redirect_stderr=False,  # messages come through message()
        )
        self._task = self._progress.add_task("starting  restarts 0  kills 0", total=None)
        self._progress.start()

    def message(self, text: str) -> None:
        self._progress.console.print(text, markup=False, highlight=False, emoji=False)

    def _show(self) -> None:
        self._progress.update(self._task, completed=self.pace.done, total=self.pace.total,
                              description=self.pace.describe(time.monotonic()))

    def close(self) -> None:
        self._progress.stop()


class _ToDisplay(logging.Handler):
    """Log records as messages of the display (never written past it)."""

    def __init__(self, display: Display, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self._display = display
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._display.message(self.format(record))
        except Exception:
            self.handleError(record)


@contextmanager
def display(units: str, unit_records: int | None, stream: TextIO | None = None) -> Iterator[Display]:
    """The display for `stream` (stderr): live on a terminal, plain elsewhere. Meanwhile the
    log's records go through it, formatted as the log's handlers format them."""
    stream = stream or sys.stderr
    pace = Pace(units, unit_records, started=time.monotonic())
    shown = LiveDisplay(pace, stream) if stream.isatty() else Display(pace, stream)
    root = logging.getLogger()
    handlers = root.handlers[:]
    formatter = handlers[0].formatter if handlers else None
    root.handlers = [_ToDisplay(shown, formatter)]
    try:
        yield shown
    finally:
        root.handlers = handlers
        shown.close()
