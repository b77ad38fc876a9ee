"""TensorBoard event files from a run's metrics rows (the ``tensorboard`` extra).

:class:`TensorBoardSink` writes one scalar per numeric key of each row, at
``step = row["step"]``, with tensorboardX (no TensorFlow)::

    sink = TensorBoardSink(run_dir / "tensorboard")
    sink.write({"step": 0, "reward/mean": 0.1, "loss": 0.5})
    sink.close()

Then ``tensorboard --logdir RUN_DIR/tensorboard``.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from pathlib import Path
from typing import Any

from rlpipe.core.errors import ConfigError, Problem

INSTALL_HINT = "pip install 'rlpipe[tensorboard]'"


class TensorBoardSink:
    """Writes metrics rows as TensorBoard scalars under ``log_dir``.

    Each :meth:`write` is flushed to disk before it returns, so a crash loses
    no finished step.  Keys whose value is not a finite number (strings,
    booleans, NaN) are skipped.

    Raises:
        ConfigError: tensorboardX is not installed (the ``tensorboard`` extra).
    """

    def __init__(self, log_dir: str | Path):
        try:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto import event_pb2, summary_pb2
        except ImportError:
            raise ConfigError(Problem("telemetry.tensorboard",
                                      f"TensorBoard output needs tensorboardX: {INSTALL_HINT}")) from None
        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # tensorboardX's SummaryWriter queues events for a thread whose flush()
        # does not wait for them; writing records directly makes write() durable.
        # The pid keeps a resumed run's file apart from its predecessor's.
        self._writer = EventsWriter(str(self.log_dir / "events"), filename_suffix=f".{os.getpid()}")

    def write(self, row: dict[str, Any]) -> None:
        """Adds a scalar for every numeric key of ``row`` at step ``row["step"]``."""
        if "step" not in row:
            raise ValueError("a metrics row needs its 'step'")
        values = [self._summary.Value(tag=key, simple_value=float(value)) for key, value in row.items()
                  if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)
                  and math.isfinite(float(value))]
        self._writer.write_event(self._event(wall_time=time.time(), step=int(row["step"]),
                                             summary=self._summary(value=values)))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
