"""The progress display of ``rlpipe train``, on stderr.

Three modes, chosen by :func:`display_mode`:

* ``bar`` (stderr is a terminal): a rich progress bar — steps done, reward,
  KL, tokens/s, elapsed time and ETA.  Messages (checkpoints, resume, stop)
  are printed through the same rich console, above the bar, so a message
  never lands on the bar's line.
* ``lines`` (stderr is a file, a pipe, a SLURM log, CI): one plain line per
  finished step — ``rlpipe: step 6 (7/20)  reward 0.412  loss 0.0123  kl
  0.0021  1.52 s/step  ETA 0:00:21`` — so a log shows the run moving.
* ``off`` (``-q``, or a process other than process 0): messages only.

Step numbers are those of ``metrics.jsonl`` (from 0); ``(7/20)`` counts the
steps done, so after step 6 the bar shows 7/20 and a stop says "after step 6
(7 of 20 steps done)".
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
from collections.abc import Iterator
from typing import Any, TextIO


def _fmt(row: dict[str, Any], key: str, spec: str) -> str:
    value = row.get(key)
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def display_mode(*, quiet: bool, primary: bool, stream: TextIO | None = None) -> str:
    """``bar``, ``lines`` or ``off`` for this process (see the module docstring)."""
    if quiet or not primary:
        return "off"
    stream = stream or sys.stderr
    return "bar" if stream.isatty() else "lines"


class ProgressDisplay:
    """What :func:`progress_display` yields: ``report(row)`` for each finished
    step's metrics (:func:`rlpipe.app.driver.train`'s ``report``) and
    ``log(message)`` for one-line messages."""

    def __init__(self, total: int, *, mode: str, prefix: str, stream: TextIO | None = None, console: Any = None):
        self.total = total
        self.mode = mode
        self.prefix = prefix
        self.stream = stream
        self.last_step: int | None = None
        self._durations: list[float] = []
        self._bar_console = console  # a rich Console for the bar (default: one on ``stream``/stderr)
        self._console: Any = None
        self._progress: Any = None
        self._task: Any = None

    # -- messages ----------------------------------------------------------------------

    def log(self, message: str) -> None:
        line = f"{self.prefix}: {message}"
        if self._console is not None:
            self._console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            stream = self.stream or sys.stderr
            print(line, file=stream, flush=True)

    def stopped(self, signal_name: str, resume_hint: str) -> str:
        """The stop message, in the progress display's own terms."""
        if self.last_step is None:
            return f"stopped by {signal_name} before a step finished; {resume_hint}"
        return (f"stopped by {signal_name} after step {self.last_step} ({self.last_step + 1} of {self.total} "
                f"steps done); {resume_hint}")

    # -- steps ------------------------------------------------------------------------

    def report(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        self.last_step = step
        duration = row.get("time/step_s")
        if isinstance(duration, (int, float)):
            self._durations.append(float(duration))
        if self.mode == "bar":
            stats = (f"reward {_fmt(row, 'reward/mean', '.3f')}  kl {_fmt(row, 'kl', '.4f')}  "
                     f"{_fmt(row, 'tokens_per_s', '.0f')} tok/s")
            self._progress.update(self._task, completed=step + 1, stats=stats)
        elif self.mode == "lines":
            self.log(self.line(row))

    def line(self, row: dict[str, Any]) -> str:
        """One step as one plain line."""
        step = int(row["step"])
        parts = [f"step {step} ({step + 1}/{self.total})", f"reward {_fmt(row, 'reward/mean', '.3f')}",
                 f"loss {_fmt(row, 'loss', '.4g')}"]
        if "kl" in row:
            parts.append(f"kl {_fmt(row, 'kl', '.4f')}")
        parts.append(f"{_fmt(row, 'time/step_s', '.2f')} s/step")
        eta = self.eta(step)
        parts.append(f"ETA {_clock(eta)}" if eta is not None else "ETA -")
        return "  ".join(parts)

    def eta(self, step: int) -> float | None:
        """Seconds left: the remaining steps at the median step time, leaving
        out the first step this process ran (it compiles) once there are others."""
        times = self._durations[1:] or self._durations
        if not times:
            return None
        return (self.total - step - 1) * statistics.median(times[-20:])

    # -- the bar -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _bar(self) -> Iterator[None]:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._console = self._bar_console or Console(file=self.stream, stderr=self.stream is None)
        self._progress = Progress(TextColumn("steps done"), MofNCompleteColumn(), BarColumn(),
                                  TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                  TimeRemainingColumn(), console=self._console, transient=False)
        self._task = self._progress.add_task("train", total=self.total, stats="")
        try:
            with self._progress:
                yield
        finally:
            self._console = None


@contextlib.contextmanager
def progress_display(total: int, *, mode: str, prefix: str = "rlpipe",
                     stream: TextIO | None = None) -> Iterator[ProgressDisplay]:
    """The progress display for a run of ``total`` steps (see the module docstring)."""
    display = ProgressDisplay(total, mode=mode, prefix=prefix, stream=stream)
    if mode != "bar":
        yield display
        return
    with display._bar():
        yield display

