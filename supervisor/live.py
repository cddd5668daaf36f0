"""A one-line live progress display for people, on stderr when it is a terminal."""

from __future__ import annotations

import sys
from typing import TextIO

from .report import RunReport


class LiveLine:
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream

    @classmethod
    def for_stderr(cls) -> LiveLine | None:
        return cls() if sys.stderr.isatty() else None

    def update(self, done: int, total: int | None, report: RunReport) -> None:
        """`done` steps of `total` (a bar), or of an unknown number (a count)."""
        unit = report.terms.unit
        counts = f"kills {len(report.kills)}  restarts {report.restarts}\x1b[K"
        if total is None:
            self._stream.write(f"\r{unit} {done}  {counts}")
        else:
            width = 30
            filled = width * done // max(total, 1)
            self._stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {unit} {done}/{total}  {counts}")
        self._stream.flush()

    def close(self) -> None:
        self._stream.write("\n")
        self._stream.flush()
