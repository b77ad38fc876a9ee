"""The run timeline: spans per role, written in Chrome trace-event format.

``trace.json`` opens in Perfetto (ui.perfetto.dev) or chrome://tracing: one
track per role, one span per unit of work (process, barrier, barrier_wait,
offload, onload, and whatever finer spans a stage adds), each carrying its
step and policy version in ``args``.  A role may add detail tracks
(:func:`detail_track`), such as one per episode slot of an agentic rollout.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Separates a role from a detail lane in a track's name (``rollout/episodes 03``).
DETAIL_SEPARATOR = "/"


def detail_track(role: str, lane: str) -> str:
    """The name of a **detail track** of ``role``: a lane of finer spans (an
    agentic rollout's episodes) shown under the role in Perfetto.  The work
    on it is already inside the role's own spans, so timeline analysis
    (:mod:`rlpipe.app.timeline`) leaves detail tracks out."""
    return f"{role}{DETAIL_SEPARATOR}{lane}"


def is_detail_track(track: str) -> bool:
    return DETAIL_SEPARATOR in track


class Trace:
    """Thread-safe collector of timeline spans."""

    def __init__(self, *, process_index: int = 0):
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._tracks: dict[str, int] = {}
        self._t0 = time.perf_counter()
        self.pid = process_index

    def now_us(self) -> float:
        return (time.perf_counter() - self._t0) * 1e6

    def _tid(self, track: str) -> int:
        if track not in self._tracks:
            self._tracks[track] = len(self._tracks) + 1
        return self._tracks[track]

    def complete(self, track: str, name: str, start_us: float, end_us: float, **args: Any) -> None:
        """Records a finished span on ``track``."""
        with self._lock:
            self._events.append({"name": name, "ph": "X", "ts": start_us, "dur": max(end_us - start_us, 0.0),
                                 "pid": self.pid, "tid": self._tid(track), "args": args})

    def instant(self, track: str, name: str, **args: Any) -> None:
        with self._lock:
            self._events.append({"name": name, "ph": "i", "s": "t", "ts": self.now_us(),
                                 "pid": self.pid, "tid": self._tid(track), "args": args})

    @contextmanager
    def span(self, track: str, name: str, **args: Any) -> Iterator[None]:
        start = self.now_us()
        try:
            yield
        finally:
            self.complete(track, name, start, self.now_us(), **args)

    def continue_from(self, path: str | Path) -> None:
        """Keeps the events of an earlier ``trace.json`` (a resumed run) and
        places this run's events after them on the same tracks."""
        try:
            data = json.loads(Path(path).read_text())
            events = data["traceEvents"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # no usable earlier trace: this run's timeline starts afresh
        names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
        end = 0.0
        with self._lock:
            for e in events:
                if e.get("ph") == "M" or e.get("tid") not in names:
                    continue
                self._events.append({**e, "pid": self.pid, "tid": self._tid(names[e["tid"]])})
                end = max(end, float(e.get("ts", 0)) + float(e.get("dur", 0)))
            # A visible gap of one second marks the restart.
            self._t0 = time.perf_counter() - (end + 1e6) / 1e6

    def events(self, track: str | None = None) -> list[dict[str, Any]]:
        """Recorded events (optionally of one track), in the order they ended."""
        with self._lock:
            if track is None:
                return list(self._events)
            tid = self._tracks.get(track)
            return [e for e in self._events if e["tid"] == tid]

    def track_of(self, event: dict[str, Any]) -> str:
        with self._lock:
            return next(name for name, tid in self._tracks.items() if tid == event["tid"])

    def to_chrome(self) -> dict[str, Any]:
        with self._lock:
            meta = [{"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid, "args": {"name": track}}
                    for track, tid in self._tracks.items()]
            return {"traceEvents": meta + sorted(self._events, key=lambda e: e["ts"]), "displayTimeUnit": "ms"}

    def write(self, path: str | Path) -> None:
        """Writes ``trace.json`` atomically (a crash never leaves half a file)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_chrome()))
        os.replace(tmp, path)
