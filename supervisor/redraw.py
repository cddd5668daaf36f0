"""Successive snapshots of a report for `status --watch`, without garbling the terminal.

On a terminal each snapshot replaces the last in place: lines are cut to the window's width (so
none wraps) and the snapshot to its height (so nothing scrolls away and the cursor can go back
to its first line). Anywhere else (a pipe, a file) each snapshot is printed whole after the last,
with a blank line between: plain text, no escape sequences.
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

_UP_TO_LINE_START = "\x1b[{}F"  # cursor up n lines, to their first column
_CLEAR_BELOW = "\x1b[J"


class Redraw:
    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._drawn = 0  # lines of the snapshot on the screen (on a terminal); snapshots elsewhere

    def show(self, text: str) -> None:
        if not self._tty:
            self._stream.write(("\n" if self._drawn else "") + text + "\n")
            self._drawn += 1
        else:
            lines = _fit(text.splitlines(), *shutil.get_terminal_size())
            back = _UP_TO_LINE_START.format(self._drawn) if self._drawn else ""
            self._stream.write(back + _CLEAR_BELOW + "".join(line + "\n" for line in lines))
            self._drawn = len(lines)
        self._stream.flush()


def _fit(lines: list[str], columns: int, rows: int) -> list[str]:
    """The lines cut to fit a window of `columns` x `rows`, one row left for the cursor."""
    room = max(rows - 1, 2)
    if len(lines) > room:
        lines = [*lines[: room - 1], f"... {len(lines) - room + 1} more lines (a taller window shows "
                 "them; --json has everything)"]
    width = max(columns - 1, 10)
    return [line[:width] for line in lines]
