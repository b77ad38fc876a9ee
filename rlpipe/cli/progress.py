"""The progress display of ``rlpipe train``: a rich progress bar on stderr.

Shown only when stderr is a terminal and ``-q`` is not given; each finished
step updates the step count, reward, KL, tokens/s and the ETA.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any


def _fmt(row: dict[str, Any], key: str, spec: str) -> str:
    value = row.get(key)
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


@contextlib.contextmanager
def progress_reporter(total: int, *, enabled: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A ``report(row)`` callback for :func:`rlpipe.app.driver.train`; a no-op when disabled."""
    if not enabled:
        yield lambda row: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[stats]}"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=False)
    task = progress.add_task("train", total=total, stats="")

    def report(row: dict[str, Any]) -> None:
        stats = (f"reward {_fmt(row, 'reward/mean', '.3f')}  kl {_fmt(row, 'kl', '.4f')}  "
                 f"{_fmt(row, 'tokens_per_s', '.0f')} tok/s")
        progress.update(task, completed=row["step"] + 1, stats=stats)

    with progress:
        yield report
