"""`report --id ID --html FILE`: a picture of an import's run, as one self-contained HTML page.

The page (report_page.html, filled in here) holds its CSS, its few lines of JS and an inline
SVG timeline, and loads nothing: it opens from a mail attachment or an air-gapped machine. The
timeline has one lane per process that ran batches (a worker, or a process of its pool) or that
the supervisor started; each execution of the batch step is a bar coloured by its outcome; the
supervisor's kills, stalls and restarts are marked. What it shows comes from run_picture.py.
"""

from __future__ import annotations

import datetime
import html
from importlib import resources
from string import Template
from typing import Any

from .run_picture import COMMITTED, FAILED, FOUND_COMMIT, UNFINISHED, Execution, RunPicture

LABEL_W = 170  # the lanes' labels, left of the plot
PLOT_W = 1000
LANE_H = 26
BAR_H = 16
TOP = 34  # room for the time axis and the restart labels
MIN_BAR_W = 2.0
OUTCOMES = {
    COMMITTED: "committed: its rows and commit row written in one transaction",
    FOUND_COMMIT: "found_commit: an earlier execution had committed it; found, not written again",
    FAILED: "failed: killed, or raised and retried (or failed for good)",
    UNFINISHED: "unfinished: in flight, or its end not seen (the import is pending)",
    "replayed": "start-up and replay: a restarted worker finds its done batches in the store and "
                "does not run them again (no execution)",
}


def render(picture: RunPicture, where: str) -> str:
    """The whole page for `picture`; `where` names the state dir or database it came from."""
    page = Template(resources.files(__package__).joinpath("report_page.html").read_text("utf-8"))
    when = datetime.datetime.fromtimestamp(picture.start, datetime.UTC)
    started = ("not started" if not picture.executions and not picture.events
               else f"started {when:%Y-%m-%d %H:%M:%S} UTC")
    notes = [f'<p class="note">{_e(n)}</p>' for n in picture.notes]
    if picture.error:
        notes.append(f'<p class="error">error: {_e(picture.error)}</p>')
    return page.substitute(
        title=_e(f"import {picture.root_id}"),
        heading=_e(f"import {picture.root_id}"),
        subheading=(f'<span class="state-{_e(picture.state)}">{_e(picture.state)}</span>'
                    f" · {started} · {_e(where)}"),
        totals=_totals(picture),
        notes="\n".join(notes),
        legend="".join(f'<span><i class="{k}"></i>{_e(v)}</span>' for k, v in OUTCOMES.items())
        + '<span>bar with a dark outline: a retry (attempt 2 or later)</span>'
        + '<span>✕ kill · ◆ stall · dashed line: restart</span>',
        timeline=_Timeline(picture).svg(),
        retries=_retries(picture.executions),
    )


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _totals(p: RunPicture) -> str:
    t = p.totals
    batches = f"{t.batches_done}" + ("" if t.batch_count is None else f"/{t.batch_count}")
    cells = [("records", "?" if t.records is None else f"{t.records:,}"), ("imported", f"{t.imported:,}"),
             ("skipped", f"{t.skipped:,}"), ("batches", batches), ("executions", f"{t.executions:,}"),
             ("kills", f"{t.kills}"), ("restarts", f"{t.restarts}"), ("wall time", f"{t.wall_s:.2f} s")]
    if t.stalls:
        cells.insert(6, ("stalls", f"{t.stalls}"))
    if t.reused:
        cells.insert(4, ("reused batches", f"{t.reused:,}"))
    return "".join(f'<div class="total" data-total="{_e(k)}"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                   for k, v in cells)


def _retries(executions: list[Execution]) -> str:
    """A table of the batches that took more than one execution, or did not commit."""
    by_batch: dict[int, list[Execution]] = {}
    for x in executions:
        by_batch.setdefault(x.batch, []).append(x)
    shown = {b: xs for b, xs in sorted(by_batch.items())
             if len(xs) > 1 or any(x.outcome not in (COMMITTED, FOUND_COMMIT) for x in xs)}
    if not shown:
        return "<h2>Retries</h2><p>Every batch committed with its first execution.</p>"
    rows = "".join(
        f"<tr><td>{x.batch}</td><td>{x.attempt}</td><td>{x.pid}</td><td>{_duration(x)}</td>"
        f"<td>{_e(x.outcome)}</td><td>{_e(x.why)}</td></tr>"
        for xs in shown.values() for x in xs)
    return ("<h2>Batches run more than once, or not committed</h2><table><tr><th>batch</th>"
            "<th>attempt</th><th>pid</th><th>duration</th><th>outcome</th><th>why</th></tr>"
            f"{rows}</table>")


def _duration(x: Execution) -> str:
    return "?" if x.finished is None else f"{x.finished - x.started:.3f} s"


def _tip(x: Execution) -> str:
    tip = f"batch {x.batch} · attempt {x.attempt} · pid {x.pid} · {_duration(x)} · {x.outcome}"
    return f"{tip} · {x.why}" if x.why else tip


class _Timeline:
    """The SVG: lanes by process, in the order they first appear; time runs left to right."""

    def __init__(self, p: RunPicture) -> None:
        self.p = p
        self.span = max(p.end - p.start, 1e-6)
        first: dict[int, float] = {}
        for t, pid in [(e["t"], e["pid"]) for e in p.events if e["event"] == "spawn"] + [
                (x.started, x.pid) for x in p.executions] + [
                (e["t"], e["pid"]) for e in p.events if e["event"] in ("kill", "stall")]:
            first.setdefault(pid, t)
        self.lanes = {pid: n for n, pid in enumerate(sorted(first, key=first.__getitem__))}
        self.workers = {e["pid"] for e in p.events if e["event"] == "spawn"}

    def x(self, t: float) -> float:
        return LABEL_W + (t - self.p.start) / self.span * PLOT_W

    def y(self, pid: int) -> float:
        return TOP + self.lanes[pid] * LANE_H

    def svg(self) -> str:
        height = TOP + len(self.lanes) * LANE_H + 4
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{LABEL_W + PLOT_W + 10}" '
                 f'height="{height}" role="img" aria-label="timeline of the run">',
                 '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
                 'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f3ebff"/>'
                 '<line x1="0" y1="0" x2="0" y2="6" stroke="#8250df" stroke-width="2"/></pattern></defs>']
        parts += self._axis(height)
        parts += self._lanes()
        parts += self._lives()
        parts += [self._bar(x) for x in self.p.executions]
        parts += self._markers(height)
        parts.append("</svg>")
        return "\n".join(parts)

    def _axis(self, height: float) -> list[str]:
        step = _tick_step(self.span)
        out, n = [], 0
        while n * step <= self.span + 1e-9:
            x = self.x(self.p.start + n * step)
            out.append(f'<line class="grid" x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{height}"/>'
                       f'<text class="axis" x="{x:.1f}" y="{TOP - 8}" text-anchor="middle">'
                       f'{n * step:g} s</text>')
            n += 1
        return out

    def _lanes(self) -> list[str]:
        exits = {e["pid"]: e for e in self.p.events if e["event"] == "exit"}
        out = []
        for pid in self.lanes:
            y = self.y(pid)
            kind = "worker" if pid in self.workers else "pool process" if self.workers else "process"
            end = exits.get(pid)
            sub = "" if end is None else f"ran {end.get('ran')}, replayed {end.get('replayed')}"
            out.append(f'<rect class="lane-bg" x="{LABEL_W}" y="{y + 1}" width="{PLOT_W}" '
                       f'height="{LANE_H - 2}"/>'
                       f'<text class="lane-label" x="4" y="{y + 11}">{kind} {pid}</text>'
                       f'<text class="lane-sub" x="4" y="{y + 22}">{_e(sub)}</text>')
        return out

    def _lives(self) -> list[str]:
        """Each worker's life (spawn to exit) as a line; its replay (spawn to its first batch
        started) as a hatched band, when it found batches done."""
        spawns = {e["pid"]: e["t"] for e in self.p.events if e["event"] == "spawn"}
        out = []
        for end in (e for e in self.p.events if e["event"] == "exit" and e["pid"] in spawns):
            pid, t0, t1 = end["pid"], spawns[end["pid"]], end["t"]
            mid = self.y(pid) + LANE_H / 2
            out.append(f'<line class="life" x1="{self.x(t0):.1f}" y1="{mid}" '
                       f'x2="{self.x(t1):.1f}" y2="{mid}"/>')
            if end.get("replayed"):
                first = min((x.started for x in self.p.executions if t0 <= x.started <= t1), default=t1)
                w = max(MIN_BAR_W, self.x(first) - self.x(t0))
                tip = (f"worker {pid}: start-up and replay until its first batch; it replayed "
                       f"{end['replayed']} batches (found them resolved in the store: not run again, "
                       "no execution)")
                out.append(f'<rect class="replayed" data-tip="{_e(tip)}" x="{self.x(t0):.1f}" '
                           f'y="{mid - BAR_H / 2}" width="{w:.1f}" height="{BAR_H}">'
                           f'<title>{_e(tip)}</title></rect>')
        return out

    def _bar(self, x: Execution) -> str:
        x0 = self.x(x.started)
        w = max(MIN_BAR_W, self.x(x.finished if x.finished is not None else self.p.end) - x0)
        y = self.y(x.pid) + (LANE_H - BAR_H) / 2
        retry = " retry" if x.attempt > 1 else ""
        text = f"{x.batch}" if x.attempt == 1 else f"{x.batch}#{x.attempt}"
        label = (f'<text class="bar-label" x="{x0 + 2:.1f}" y="{y + 11.5}">{text}</text>'
                 if w > 7 * len(text) else "")
        tip = _e(_tip(x))
        return (f'<rect class="bar {x.outcome}{retry}" data-batch="{x.batch}" data-attempt="{x.attempt}" '
                f'data-pid="{x.pid}" data-tip="{tip}" x="{x0:.1f}" y="{y}" width="{w:.1f}" '
                f'height="{BAR_H}" rx="2"><title>{tip}</title></rect>{label}')

    def _markers(self, height: float) -> list[str]:
        out, restarts = [], 0
        for e in self.p.events:
            x = self.x(e["t"])
            if e["event"] in ("kill", "stall") and e["pid"] in self.lanes:
                cy = self.y(e["pid"]) + LANE_H / 2
                unit = "" if e.get("unit") is None else f" during batch {e['unit']}"
                if e["event"] == "kill":
                    whom = (f"pool process {e['pid']} of worker {e['worker']}" if e.get("worker")
                            else f"worker {e['pid']}")
                    tip = f"SIGKILL ({e.get('kind')}) to {whom}{unit}"
                    shape = _cross(x, cy)
                else:
                    tip = f"worker {e['pid']} stalled{unit}: silent {e.get('silent_s')} s; SIGKILLed"
                    shape = f"M{x:.1f},{cy - 7} L{x + 7:.1f},{cy} L{x:.1f},{cy + 7} L{x - 7:.1f},{cy} Z"
                out.append(f'<path class="{e["event"]}" data-tip="{_e(tip)}" d="{shape}">'
                           f"<title>{_e(tip)}</title></path>")
            elif e["event"] == "restart":
                restarts += 1
                tip = f"restart {restarts}: a new worker after worker {e.get('after')} ended"
                out.append(f'<g class="restart-mark" data-tip="{_e(tip)}"><title>{_e(tip)}</title>'
                           f'<line class="restart" x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{height}"/>'
                           f'<text class="restart-label" x="{x + 2:.1f}" y="{TOP - 20}">'
                           f'↻{restarts}</text></g>')
        return out


def _cross(x: float, y: float, r: float = 6.0) -> str:
    """An ✕ (a filled shape, so that it can be pointed at) centred on (x, y)."""
    a, b = r, r / 3
    points = [(-a, -a + b), (-a + b, -a), (0, -b), (a - b, -a), (a, -a + b), (b, 0), (a, a - b),
              (a - b, a), (0, b), (-a + b, a), (-a, a - b), (-b, 0)]
    return "M" + " L".join(f"{x + dx:.1f},{y + dy:.1f}" for dx, dy in points) + " Z"


def _tick_step(span: float) -> float:
    """The first round step giving at most 10 ticks over `span` seconds."""
    return next((step for step in _TICK_STEPS if span / step <= 10), span / 10)


_TICK_STEPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600,
               7200, 14400, 28800, 86400)
