"""Graceful stop on SIGTERM and SIGINT for ``rlpipe train``.

The first signal asks the run to finish the steps it has started, write a
checkpoint and return; the command then exits 143 (SIGTERM) or 130 (SIGINT).
If that takes longer than the grace period, or a second signal arrives, the
run is abandoned at once: the process exits with the same status and the
previous checkpoint stays the one to resume from.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

_EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}


class StopState:
    """Which signal stopped the run (``None`` if none)."""

    signal: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    @property
    def exit_code(self) -> int:
        return _EXIT.get(self.signal, 1)


@contextlib.contextmanager
def graceful_stop(control: Any, *, grace_s: float, log: Callable[[str], None]) -> Iterator[StopState]:
    """Routes SIGTERM and SIGINT to ``control.request_stop()`` while the block runs."""
    state = StopState()
    if threading.current_thread() is not threading.main_thread():
        yield state  # signal handlers can only be installed from the main thread
        return

    def abandon(code: int, why: str) -> None:
        log(f"{why}; abandoning the run (the previous checkpoint stays valid)")
        sys.stderr.flush()
        os._exit(code)

    def handler(signum: int, frame: Any) -> None:
        if state.signal is not None:
            abandon(_EXIT.get(signum, 1), f"second {signal.Signals(signum).name}")
        state.signal = signum
        log(f"{signal.Signals(signum).name}: finishing the current step and writing a checkpoint "
            f"(at most {grace_s:g}s; signal again to abandon)")
        timer = threading.Timer(grace_s, abandon, args=(_EXIT.get(signum, 1), f"grace period of {grace_s:g}s exceeded"))
        timer.daemon = True
        timer.start()
        control.request_stop()

    previous = {s: signal.signal(s, handler) for s in _EXIT}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
