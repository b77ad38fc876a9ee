"""Benchmark results: one JSON object per measurement, and the table people read.

Every record has the five keys other tools rely on:

* ``name``: what was measured (``copy_bandwidth``, ``pipeline_step_time``, ...);
* ``value``: the number, or ``None`` where it could not be measured (the
  record then says why in ``note``);
* ``unit``: ``s``, ``GB/s``, ``tokens/s``, ``bytes``, ``fraction``, ``x``, ...;
* ``ceiling``: the physical limit the value is held against, or ``None``;
* ``ratio``: ``value / ceiling``, or ``None``.

Anything else (preset, batch, platform, breakdowns) is a descriptive field.
Records go to stdout as JSON lines (and to ``--out`` files), the table to
stderr, so ``> results.jsonl`` keeps the data and the terminal the table.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from typing import IO, Any

#: The keys every record has, in this order.
KEYS = ("name", "value", "unit", "ceiling", "ratio")


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: they become ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def record(name: str, value: float | int | None, unit: str, *, ceiling: float | None = None, **fields: Any) -> dict[str, Any]:
    """A measurement with ``ratio = value / ceiling`` filled in where both exist."""
    ratio = value / ceiling if value is not None and ceiling else None
    return _clean({"name": name, "value": value, "unit": unit, "ceiling": ceiling, "ratio": ratio, **fields})


def paired_speedup(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """Median of the per-repeat ratios ``ours[i] / theirs[i]`` (pairs with a zero left out)."""
    import statistics

    return statistics.median(a / b for a, b in zip(ours, theirs) if a and b)


def compare_forms(name: str, forms: dict[str, Any], pairs: int, *, before: str, after: str,
                  **fields: Any) -> list[dict[str, Any]]:
    """Times the zero-argument calls ``forms`` (each must return only once its
    work is done), alternating, ``pairs`` times each; returns a
    ``<name>_time`` record per form (median, s) and ``<name>_speedup``, the
    median over pairs of ``before``'s time / ``after``'s (> 1: ``after`` is faster)."""
    import statistics
    import time as _time

    times: dict[str, list[float]] = {form: [] for form in forms}
    for _ in range(pairs):
        for form, fn in forms.items():
            start = _time.perf_counter()
            fn()
            times[form].append(_time.perf_counter() - start)
    out = [record(f"{name}_time", statistics.median(t), "s", form=form, pairs=pairs, **fields) for form, t in times.items()]
    out.append(record(f"{name}_speedup", paired_speedup(times[before], times[after]), "x", before=before, after=after,
                      pairs=pairs, **fields))
    return out


def check(rec: dict[str, Any]) -> dict[str, Any]:
    """Raises ``ValueError`` unless ``rec`` follows the schema above."""
    missing = [k for k in KEYS if k not in rec]
    if missing:
        raise ValueError(f"record {rec.get('name')!r} lacks {missing}")
    if not isinstance(rec["name"], str) or not rec["name"]:
        raise ValueError(f"record name must be a non-empty string, got {rec['name']!r}")
    for key in ("value", "ceiling", "ratio"):
        if rec[key] is not None and (isinstance(rec[key], bool) or not isinstance(rec[key], (int, float))):
            raise ValueError(f"record {rec['name']!r}: {key} must be a number or null, got {rec[key]!r}")
    if rec["unit"] is not None and not isinstance(rec["unit"], str):
        raise ValueError(f"record {rec['name']!r}: unit must be a string")
    if rec["ratio"] is not None and rec["ceiling"] is None:
        raise ValueError(f"record {rec['name']!r}: a ratio needs a ceiling")
    return rec


class Sink:
    """Writes each record as it is made: a JSON line to every stream in
    ``streams`` (flushed, so a run cut short keeps what it measured)."""

    def __init__(self, streams: Iterable[IO[str]] = ()):
        self.streams = list(streams)
        self.records: list[dict[str, Any]] = []

    def __call__(self, rec: dict[str, Any]) -> dict[str, Any]:
        check(rec)
        line = json.dumps(rec)
        for stream in self.streams:
            stream.write(line + "\n")
            stream.flush()
        self.records.append(rec)
        return rec

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for rec in records:
            self(rec)


def stdout_sink() -> Sink:
    return Sink([sys.stdout])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(records: Sequence[dict[str, Any]], *, labels: Sequence[str] = (), out: IO[str] | None = None) -> None:
    """A fixed-width table of ``records``; ``labels`` are descriptive fields
    shown as columns after the name (``batch``, ``role``, ...), where present."""
    out = out or sys.stderr
    labels = [k for k in labels if any(k in r for r in records)]
    rows = [("measurement", *labels, "value", "unit", "ceiling", "ratio")]
    for r in records:
        ratio = f"{100 * r['ratio']:.1f}%" if r.get("ratio") is not None else "-"
        rows.append((r["name"], *(_fmt(r.get(k)) for k in labels), _fmt(r["value"]), r["unit"] or "-",
                     _fmt(r.get("ceiling")), ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    left = {0, *range(1, 1 + len(labels)), len(labels) + 2}
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j in left else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)
    out.flush()


def timed(fn: Any, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` (which must block until its result is ready)."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out
