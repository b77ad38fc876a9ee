"""Reading a run's timeline: busy intervals, idle bubbles and overlap per device group.

Pure Python over the Chrome trace events that :class:`rlpipe.runtime.trace.Trace`
writes, so benchmarks and tests can reuse it without JAX or plotting.

Definitions (also in docs/runs.md):

* A span is **busy** unless it is a ``barrier_wait`` (a role holding finished
  work while it waits for the global-batch barrier).  ``process`` and
  ``barrier`` spans and the finer spans nested in them (``generate``,
  ``logprobs``, ``train``, ``weight_sync``) are busy, and so are ``offload`` and
  ``onload``: the devices are occupied moving state, not free for other work.
* A role's busy time is the length of the union of its busy spans (nested
  spans are not counted twice).
* A **device group** is a set of roles whose devices (``plan.json``) overlap,
  closed transitively; roles that work on the host form the ``host`` group.
* A group's **idle fraction** over a window is the share of the window's wall
  time covered by no busy span of any of its roles.
* A group's **overlap ratio** is the sum of its roles' busy times divided by
  the window's wall time: above 1 when roles on the group run at once.

Example::

    spans = load_trace("runs/x/trace.json")
    groups = device_groups(json.loads(Path("runs/x/plan.json").read_text()), host_roles={"reward"})
    summary = analyse(spans, groups, step_window(spans, last_steps=5))
    print(summary.to_json()["groups"])
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from rlpipe.core.errors import TraceError
from rlpipe.runtime.trace import is_detail_track

Interval = tuple[float, float]

#: Span names that are not busy time (see the module docstring).
NOT_BUSY = frozenset({"barrier_wait", "device_wait"})
#: Span names that wrap a stage's whole call; finer spans nest inside them.
OUTER = frozenset({"process", "barrier"})
HOST = "host"


@attrs.frozen
class Span:
    """One finished span of the timeline; times in seconds since the trace began."""

    role: str
    name: str
    start: float
    end: float
    step: int | None = None
    policy_version: int | None = None
    #: The micro-batch (item) index, for spans of one item.
    index: int | None = None
    #: Which trace document the span came from, when a file holds several
    #: (a resumed run appending); later segments are shifted to follow earlier ones.
    segment: int = 0

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def busy(self) -> bool:
        return self.name not in NOT_BUSY


@attrs.frozen
class Window:
    """The analysed stretch of the run: wall time from ``start`` to ``end``
    (seconds), covering the work of ``steps``."""

    start: float
    end: float
    steps: tuple[int, ...] = ()

    @property
    def wall(self) -> float:
        return self.end - self.start


@attrs.frozen
class DeviceGroup:
    """Roles that share devices (``devices`` empty for the host group)."""

    name: str
    devices: tuple[int, ...]
    roles: tuple[str, ...]


@attrs.frozen
class RoleUsage:
    role: str
    group: str | None
    busy_s: float
    busy_fraction: float
    #: Time per span name (union per name, so nested spans of one name count once).
    by_kind: dict[str, float]


@attrs.frozen
class GroupUsage:
    group: DeviceGroup
    busy_s: float
    idle_fraction: float
    overlap_ratio: float


@attrs.frozen
class TimelineSummary:
    window: Window
    groups: tuple[GroupUsage, ...]
    roles: tuple[RoleUsage, ...]

    def to_json(self) -> dict[str, Any]:
        w = self.window
        return {
            "window": {"steps": list(w.steps), "start_s": w.start, "end_s": w.end, "wall_s": w.wall},
            "groups": [{"name": g.group.name, "devices": list(g.group.devices), "roles": list(g.group.roles),
                        "busy_s": g.busy_s, "idle_fraction": g.idle_fraction, "overlap_ratio": g.overlap_ratio}
                       for g in self.groups],
            "roles": [{"name": r.role, "group": r.group, "busy_s": r.busy_s, "busy_fraction": r.busy_fraction,
                       "by_kind": dict(r.by_kind)} for r in self.roles],
        }


# -- intervals ----------------------------------------------------------------------


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of ``intervals`` as sorted, disjoint intervals (empty ones dropped)."""
    out: list[Interval] = []
    for s, e in sorted((s, e) for s, e in intervals if e > s):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def length(intervals: Iterable[Interval]) -> float:
    """Summed length of ``intervals`` (overlaps count twice: take :func:`union` first for covered time)."""
    return sum(max(e - s, 0.0) for s, e in intervals)


def clip(intervals: Iterable[Interval], start: float, end: float) -> list[Interval]:
    """``intervals`` cut to ``[start, end]``; those outside it are dropped."""
    return [(max(s, start), min(e, end)) for s, e in intervals if min(e, end) > max(s, start)]


def intersect(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
    """Where both ``a`` and ``b`` cover, as sorted, disjoint intervals."""
    a, b = union(a), union(b)
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
    """The parts of ``a`` that ``b`` does not cover, as sorted, disjoint intervals."""
    out = []
    holes = union(b)
    for start, end in union(a):
        cur = start
        for hs, he in holes:
            if he <= cur or hs >= end:
                continue
            if hs > cur:
                out.append((cur, hs))
            cur = max(cur, he)
        if cur < end:
            out.append((cur, end))
    return out


def gaps(intervals: Iterable[Interval], start: float, end: float) -> list[Interval]:
    """The parts of ``[start, end]`` that no interval covers (the idle bubbles)."""
    out, at = [], start
    for s, e in union(clip(intervals, start, end)):
        if s > at:
            out.append((at, s))
        at = max(at, e)
    if end > at:
        out.append((at, end))
    return out


# -- reading traces -------------------------------------------------------------------


def _documents(text: str, where: str) -> list[Any]:
    """The JSON documents in ``text``: one object, an array, a truncated array (the
    trace-event format allows a missing ``]``), or several documents one after another."""
    stripped = text.strip()
    if not stripped:
        raise TraceError(f"{where}: empty file")
    if stripped.startswith("[") and not stripped.endswith("]"):
        stripped = stripped.rstrip().rstrip(",") + "]"
    decoder = json.JSONDecoder()
    docs, at = [], 0
    while at < len(stripped):
        try:
            doc, at = decoder.raw_decode(stripped, at)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
        docs.append(doc)
        while at < len(stripped) and stripped[at] in " \t\r\n":
            at += 1
    return docs


def _events(doc: Any, where: str) -> list[Any]:
    if isinstance(doc, Mapping):
        events = doc.get("traceEvents")
        if not isinstance(events, list):
            raise TraceError(f"{where}: a trace object needs a 'traceEvents' list")
        return events
    if isinstance(doc, list):
        return doc
    raise TraceError(f"{where}: expected a trace object or an array of events, got {type(doc).__name__}")


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_trace(doc: Any, *, where: str = "trace", segment: int = 0) -> list[Span]:
    """The complete (``"ph": "X"``) spans of one Chrome trace document, sorted by start.

    Tracks are named by their ``thread_name`` metadata events (rlpipe names
    each after its role); a track without one is called ``tid <n>``.

    Raises:
        TraceError: the document is not trace-event JSON or a span lacks its times.
    """
    events = _events(doc, where)
    names: dict[tuple[Any, Any], str] = {}
    for ev in events:
        if isinstance(ev, Mapping) and ev.get("ph") == "M" and ev.get("name") == "thread_name":
            label = (ev.get("args") or {}).get("name") if isinstance(ev.get("args"), Mapping) else None
            if isinstance(label, str):
                names[(ev.get("pid"), ev.get("tid"))] = label
    spans = []
    for i, ev in enumerate(events):
        if not isinstance(ev, Mapping):
            raise TraceError(f"{where}: event {i} is not an object")
        if ev.get("ph") != "X":
            continue
        ts, dur = ev.get("ts"), ev.get("dur", 0.0)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (ts, dur)):
            raise TraceError(f"{where}: span {i} ({ev.get('name')!r}) needs numeric 'ts' and 'dur'")
        args = ev.get("args") if isinstance(ev.get("args"), Mapping) else {}
        key = (ev.get("pid"), ev.get("tid"))
        spans.append(Span(role=names.get(key, f"tid {key[1]}"), name=str(ev.get("name", "")),
                          start=ts / 1e6, end=(ts + max(dur, 0.0)) / 1e6, step=_int_or_none(args.get("step")),
                          policy_version=_int_or_none(args.get("policy_version")),
                          index=_int_or_none(args.get("index")), segment=segment))
    return sorted(spans, key=lambda s: (s.start, -s.end))


def load_trace(path: str | Path) -> list[Span]:
    """The spans of a ``trace.json`` (see :func:`parse_trace`).

    A file holding several trace documents one after another (a resumed run
    appending its own) is read as consecutive segments: each segment's times
    are shifted to start where the previous one ended, and its spans carry
    the segment's index.

    Raises:
        TraceError: the file is missing, unreadable or not trace-event JSON.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read ({exc})") from None
    spans: list[Span] = []
    offset = 0.0
    for segment, doc in enumerate(_documents(text, str(path))):
        part = parse_trace(doc, where=str(path), segment=segment)
        if segment and part:
            part = [attrs.evolve(s, start=s.start + offset, end=s.end + offset) for s in part]
        spans.extend(part)
        if spans:
            offset = max(s.end for s in spans)
    return spans


# -- groups and windows ---------------------------------------------------------------


def device_label(ids: Iterable[int]) -> str:
    """How a set of devices is named: ``device 0``, ``devices 0-3``, ``devices 0,1``,
    ``devices 0-2,5-7`` (runs of three or more consecutive ids as ranges)."""
    ids = sorted(set(ids))
    if len(ids) == 1:
        return f"device {ids[0]}"
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    parts = [f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs]
    return f"devices {','.join(parts)}"


def device_groups(plan: Mapping[str, Any], *, host_roles: Iterable[str] = ()) -> list[DeviceGroup]:
    """Roles grouped by shared devices, from a ``plan.json`` (``rlpipe plan --json``) object.

    Roles whose device lists overlap are in one group (transitively); roles in
    ``host_roles`` or without devices are in the ``host`` group, last.  Groups
    are ordered by their lowest device and named by :func:`device_label`
    (``device 0``, ``devices 0-3``).
    """
    host_roles = set(host_roles)
    placed: list[tuple[str, set[int]]] = []
    host: list[str] = []
    for role in plan.get("roles", []):
        name, devices = role["name"], set(role.get("devices") or ())
        if name in host_roles or not devices:
            host.append(name)
        else:
            placed.append((name, devices))
    merged: list[tuple[list[str], set[int]]] = []
    for name, devices in placed:
        touching = [g for g in merged if g[1] & devices]
        roles, devs = [name], set(devices)
        for g in touching:
            roles, devs = g[0] + roles, devs | g[1]
            merged.remove(g)
        merged.append((roles, devs))
    groups = [DeviceGroup(name=device_label(devs), devices=tuple(sorted(devs)), roles=tuple(roles))
              for roles, devs in sorted(merged, key=lambda g: min(g[1]))]
    if host:
        groups.append(DeviceGroup(name=HOST, devices=(), roles=tuple(host)))
    return groups


def restart_time(spans: Sequence[Span]) -> float | None:
    """When the latest resume of the run began, or ``None`` for a run never resumed.

    Each role works through its items in order (``process`` of step 0 item 0,
    1, ..., ``barrier`` of step 0, step 1, ...), so a role's track going back
    to an item it already did marks a resume (a resumed run keeps the earlier
    trace and redoes the steps after its checkpoint).  The result is the
    earliest of the roles' latest such points.
    """
    latest: dict[str, float] = {}
    done: dict[str, tuple[int, int, int]] = {}
    for s in sorted(spans, key=lambda s: s.start):
        if s.name not in OUTER or s.step is None:
            continue
        at = (s.step, 1, 0) if s.name == "barrier" else (s.step, 0, s.index or 0)
        if s.role in done and at <= done[s.role]:
            latest[s.role] = s.start
        done[s.role] = at
    return min(latest.values()) if latest else None


def step_window(spans: Sequence[Span], last_steps: int | None = None, *, last_step: int | None = None) -> Window | None:
    """The wall-time window of the last ``last_steps`` steps (all when ``None``).

    Steps are read from the spans' ``step`` argument, up to ``last_step`` when
    given (for instance the last step the metrics say finished).  The window
    runs from the first busy span of the earliest chosen step to the end of the
    last busy span of any chosen step; only the latest trace segment holding
    the last chosen step is used, and after a resume (:func:`restart_time`)
    only the resumed part of the run.  ``None`` when no busy span has a step.
    """
    stepped = [s for s in spans if s.busy and s.step is not None and (last_step is None or s.step <= last_step)]
    if not stepped:
        return None
    last = max(s.step for s in stepped)
    segment = max(s.segment for s in stepped if s.step == last)
    stepped = [s for s in stepped if s.segment == segment]
    restart = restart_time(stepped)
    if restart is not None and any(s.step == last and s.start >= restart for s in stepped):
        stepped = [s for s in stepped if s.start >= restart]
    steps = sorted({s.step for s in stepped})
    if last_steps is not None:
        steps = steps[-max(last_steps, 1):]
    chosen = [s for s in stepped if s.step in set(steps)]
    return Window(start=min(s.start for s in chosen), end=max(s.end for s in chosen), steps=tuple(steps))


def full_window(spans: Sequence[Span]) -> Window | None:
    """The window from the first span's start to the last span's end."""
    if not spans:
        return None
    return Window(start=min(s.start for s in spans), end=max(s.end for s in spans))


# -- busy time ----------------------------------------------------------------------


def busy_intervals(spans: Iterable[Span], roles: Iterable[str] | None = None, *,
                   window: Window | None = None) -> list[Interval]:
    """The union of the busy spans of ``roles`` (all roles when ``None``), clipped to ``window``."""
    spans = list(spans)
    wanted = {s.role for s in spans} if roles is None else set(roles)
    # Per role, waits nested in its busy spans (device_wait inside process) are
    # cut out before the roles are merged: one role's wait is not idle time
    # while another role of the group works.
    per_role = []
    for role in wanted:
        busy = [(s.start, s.end) for s in spans if s.role == role and s.busy]
        waits = [(s.start, s.end) for s in spans if s.role == role and not s.busy]
        per_role.extend(subtract(busy, waits))
    out = union(per_role)
    return out if window is None else clip(out, window.start, window.end)


def idle_fraction(spans: Sequence[Span], roles: Iterable[str], window: Window) -> float:
    """The share of ``window``'s wall time in which none of ``roles`` is busy."""
    if window.wall <= 0:
        return 0.0
    return 1.0 - length(busy_intervals(spans, roles, window=window)) / window.wall


def overlap_ratio(spans: Sequence[Span], roles: Iterable[str], window: Window) -> float:
    """Sum of the roles' busy times over ``window``'s wall time (above 1: roles ran at once)."""
    if window.wall <= 0:
        return 0.0
    return sum(length(busy_intervals(spans, [r], window=window)) for r in set(roles)) / window.wall


def analyse(spans: Sequence[Span], groups: Sequence[DeviceGroup], window: Window) -> TimelineSummary:
    """Busy time per role and idle fraction and overlap ratio per group over ``window``.

    A track with spans that is in no group (not a role of the plan, such as
    ``checkpoint``) gets a group of its own named ``<track> (not in plan)``;
    detail tracks (``rollout/episodes 00``, :func:`rlpipe.runtime.trace.detail_track`)
    are left out.
    """
    spans = [s for s in spans if not is_detail_track(s.role)]  # their work is inside their role's spans
    roles_with_spans = list(dict.fromkeys(s.role for s in spans))
    grouped = {r for g in groups for r in g.roles}
    groups = [*groups, *(DeviceGroup(name=f"{r} (not in plan)", devices=(), roles=(r,))
                         for r in roles_with_spans if r not in grouped)]
    group_of = {r: g.name for g in groups for r in g.roles}
    role_usage = []
    for role in [r for g in groups for r in g.roles]:
        mine = [s for s in spans if s.role == role]
        busy = length(busy_intervals(mine, window=window))
        kinds = dict.fromkeys(s.name for s in mine)
        by_kind = {k: length(clip(union((s.start, s.end) for s in mine if s.name == k), window.start, window.end))
                   for k in kinds}
        role_usage.append(RoleUsage(role=role, group=group_of[role], busy_s=busy,
                                    busy_fraction=busy / window.wall if window.wall > 0 else 0.0,
                                    by_kind={k: v for k, v in by_kind.items() if v > 0}))
    group_usage = [GroupUsage(group=g, busy_s=length(busy_intervals(spans, g.roles, window=window)),
                              idle_fraction=idle_fraction(spans, g.roles, window),
                              overlap_ratio=overlap_ratio(spans, g.roles, window)) for g in groups]
    return TimelineSummary(window=window, groups=tuple(group_usage), roles=tuple(role_usage))
