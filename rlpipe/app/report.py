"""``rlpipe report``: plots and a one-page summary of a run directory.

:func:`write_report` reads ``metrics.jsonl``, ``plan.json``, ``config.yaml`` and
``trace.json`` and writes, into ``RUN_DIR/report/`` by default:

* ``reward.png``: ``reward/mean`` per step with a smoothed line;
* ``losses.png``: a grid of small panels (:func:`metric_panels`), one per
  quantity present — losses, KL, entropy, grad norm, clip fractions — each
  titled with its metrics' names and y-labelled with the quantity and its unit;
* ``timeline.png``: the last steps (the title says which, of how many), one row
  per role grouped by device group, each role's ``process``/``barrier`` bars in
  a colour of its own with the finer spans nested in them coloured by kind,
  spans too short to see widened, and each group's busy time as a strip whose
  gaps are its idle bubbles;
* ``episodes.png`` (agentic runs): the episode lanes (the first 16) of the
  last step's first item — each episode's span, its turns' ``generate`` and ``step``
  spans and its ``tool`` calls (the detail tracks ``rollout/episodes NN``);
* ``report.md``: run facts, the images, and the idle fraction of each device
  group with each role's busy time (definitions in :mod:`rlpipe.app.timeline`).

A crashed run is reported on as far as its files go: unreadable metrics lines
are skipped and a missing trace leaves out the timeline, each with a note.
Problems that leave nothing to report raise :class:`~rlpipe.core.errors.RunDirError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from rlpipe.app import timeline as tl
from rlpipe.core.errors import RunDirError
from rlpipe.runtime.trace import DETAIL_SEPARATOR, is_detail_track

DEFAULT_LAST_STEPS = 5

#: Colours per span kind (see :func:`kind_colours` for the others).
KIND_COLOURS = {
    "generate": "#4C72B0",
    "logprobs": "#DD8452",
    "train": "#55A868",
    "weight_sync": "#8172B3",
    "offload": "#937860",
    "onload": "#C4A484",
    "process": "#C8D3E0",
    "barrier": "#D9D9D9",
    "barrier_wait": "#F2F2F2",
    "device_wait": "#F2F2F2",
    "snapshot": "#DA8BC3",
    "save": "#8C8C8C",
}
#: Span kinds drawn hatched: waits, not work.
KIND_HATCHES = {"barrier_wait": "////", "device_wait": "\\\\\\\\"}
#: Colours for span kinds without one of their own, in order of appearance.
OTHER_COLOURS = ("#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD", "#E377C2", "#17BECF")


def kind_colours(kinds: Iterable[str]) -> dict[str, str]:
    """A colour for each span kind: its own, or the next of :data:`OTHER_COLOURS`
    that no kind of ``kinds`` has as its own."""
    kinds = list(dict.fromkeys(kinds))
    taken = {KIND_COLOURS[k] for k in kinds if k in KIND_COLOURS}
    spare = [c for c in OTHER_COLOURS if c not in taken] or list(OTHER_COLOURS)
    out, extra = {}, 0
    for kind in kinds:
        if kind in KIND_COLOURS:
            out[kind] = KIND_COLOURS[kind]
        else:
            out[kind] = spare[extra % len(spare)]
            extra += 1
    return out


@attrs.frozen
class RunRecords:
    """What a run directory holds, as far as it could be read."""

    run_dir: Path
    metrics: tuple[dict[str, Any], ...]
    config: dict[str, Any] | None
    plan: dict[str, Any] | None
    spans: tuple[tl.Span, ...] | None
    notes: tuple[str, ...]


@attrs.frozen
class Report:
    files: tuple[Path, ...]
    summary: dict[str, Any]
    notes: tuple[str, ...]


# -- reading ------------------------------------------------------------------------


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of ``metrics.jsonl`` by step, with notes on what was skipped.

    Lines that are not JSON objects with an integer ``step`` are skipped (a crash
    can cut the last line).  When a step appears more than once (a resumed run
    redoing steps after its last checkpoint) the last row for it is kept.
    """
    notes: list[str] = []
    rows: dict[int, dict[str, Any]] = {}
    skipped: list[int] = []
    repeated = 0
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            skipped.append(lineno)
            continue
        repeated += row["step"] in rows
        rows[row["step"]] = row
    if skipped:
        where = ", ".join(map(str, skipped[:5])) + (" ..." if len(skipped) > 5 else "")
        notes.append(f"{path.name}: skipped {len(skipped)} unreadable line(s) (line {where})")
    if repeated:
        notes.append(f"{path.name}: {repeated} step(s) logged more than once (a resumed run); the last row of each is used")
    return [rows[s] for s in sorted(rows)], notes


def _read_json_object(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.exists():
        notes.append(f"no {path.name}")
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise RunDirError(f"{path}: expected a JSON object")
    return doc


def _check_plan(path: Path, plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """``plan`` if its roles are what :func:`rlpipe.app.timeline.device_groups` reads."""
    if plan is None:
        return None
    roles = plan.get("roles")
    ok = isinstance(roles, list) and all(
        isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("devices", []), list)
        and all(isinstance(d, int) for d in r.get("devices", [])) for r in roles)
    if not ok:
        raise RunDirError(f"{path}: 'roles' must be a list of objects with a 'name' and a 'devices' list of ids "
                          "(the rlpipe plan --json format)")
    return plan


def _read_config(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.exists():
        notes.append(f"no {path.name}")
        return None
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        notes.append(f"{path.name}: not readable YAML ({str(exc).splitlines()[0]}); run facts from it are left out")
        return None
    return doc if isinstance(doc, dict) else None


def read_run(run_dir: str | Path) -> RunRecords:
    """Reads a run directory.

    Raises:
        RunDirError: the directory is missing or has no metrics rows.
        TraceError: ``trace.json`` exists but is not trace-event JSON.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunDirError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory (give the run directory, not a file in it)")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise RunDirError(f"{run_dir}: no metrics.jsonl (not a run directory, or the run failed before its first step)")
    try:
        metrics, notes = read_metrics(metrics_path)
    except OSError as exc:
        raise RunDirError(f"{metrics_path}: cannot read ({exc.strerror or exc})") from None
    if not metrics:
        raise RunDirError(f"{metrics_path}: no metrics rows (the run failed before its first step finished?)")
    config = _read_config(run_dir / "config.yaml", notes)
    plan = _check_plan(run_dir / "plan.json", _read_json_object(run_dir / "plan.json", notes))
    trace_path = run_dir / "trace.json"
    spans = None
    if trace_path.exists():
        spans = tl.load_trace(trace_path)
    else:
        notes.append("no trace.json (the run may still be running or have been killed): no timeline")
    return RunRecords(run_dir=run_dir, metrics=tuple(metrics), config=config, plan=plan,
                      spans=None if spans is None else tuple(spans), notes=tuple(notes))


def host_roles(role_names: Iterable[str]) -> set[str]:
    """The roles whose registered spec says they work on the host only
    (``uses_devices=False``); empty when the plugins cannot be loaded."""
    try:
        from rlpipe.core.plugins import load_registry

        roles = load_registry(warn=lambda _message: None).provided("rlpipe_roles")
        return {name for name in role_names if name in roles and not roles[name].spec.uses_devices}
    except Exception:  # noqa: BLE001 - without plugins every planned role counts as a device role
        return set()


# -- numbers ------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(metrics: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in metrics if _finite(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


@attrs.frozen
class MetricPanel:
    """One small plot of ``losses.png``: metrics of one quantity (and one role),
    drawn on the same axes."""

    title: str
    ylabel: str
    keys: tuple[str, ...]


#: The quantities ``losses.png`` draws, in order: (y label with unit, test on
#: the key's last ``/`` part).  A key goes to the first that matches; a
#: critic's value loss is a loss, drawn apart because its scale differs.
PANEL_QUANTITIES: tuple[tuple[str, Any], ...] = (
    ("loss (unitless)", lambda leaf: "loss" in leaf and leaf != "value_loss"),
    ("value loss (reward²)", lambda leaf: leaf == "value_loss"),
    ("KL (nats/token)", lambda leaf: leaf.startswith("kl") or leaf.endswith("_kl")),
    ("entropy (nats/token)", lambda leaf: leaf.startswith("entropy")),
    ("grad norm (L2, before clipping)", lambda leaf: leaf == "grad_norm"),
    ("clip fraction (share of tokens)", lambda leaf: "clip_frac" in leaf),
)
#: Keys drawn first in their panel (then ``*_low`` before ``*_high``, then by name).
_FIRST_IN_PANEL = ("loss", "kl", "entropy", "grad_norm")


def metric_panels(metrics: Sequence[dict[str, Any]]) -> list[MetricPanel]:
    """The panels of ``losses.png`` for the keys present in ``metrics``.

    One panel per quantity of :data:`PANEL_QUANTITIES` and per role prefix
    (``critic/value_loss`` gets its own, beside the trainer's ``loss``,
    ``pg_loss``): losses, KL (``kl``, ``ppo_kl``), ``entropy``, ``grad_norm``
    and clip fractions (``clip_frac_low``, ``clip_frac_high``, ...), in that
    order, the trainer's (unprefixed) before other roles'.  A panel is titled
    with its metrics' names.
    """
    found: dict[tuple[int, str], dict[str, None]] = {}
    for row in metrics:
        for key, value in row.items():
            if not _finite(value):
                continue
            prefix, _, leaf = key.rpartition("/")
            for order, (_, matches) in enumerate(PANEL_QUANTITIES):
                if matches(leaf):
                    found.setdefault((order, prefix), {})[key] = None
                    break

    def rank(panel: tuple[int, str]) -> tuple[int, bool, str, int]:
        order, prefix = panel
        # another role's losses (``critic/value_loss``) right after the trainer's
        return (max(order, 1) if prefix else order, prefix != "", prefix, order)

    panels = []
    for order, prefix in sorted(found, key=rank):
        keys = sorted(found[order, prefix],
                      key=lambda k: (k.rsplit("/", 1)[-1] not in _FIRST_IN_PANEL, k.endswith("_high"), k))
        panels.append(MetricPanel(title=", ".join(keys), ylabel=PANEL_QUANTITIES[order][0], keys=tuple(keys)))
    return panels


def smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Trailing moving average over ``window`` points (a tenth of the run, at least 2)."""
    if window is None:
        window = max(2, round(len(values) / 10))
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: RunRecords, *, last_steps: int | None = DEFAULT_LAST_STEPS,
              host: set[str] | None = None) -> tuple[dict[str, Any], tl.TimelineSummary | None, list[tl.DeviceGroup]]:
    """The report's numbers (the ``--json`` object), the timeline analysis and the device groups."""
    metrics = records.metrics
    _, rewards = _series(metrics, "reward/mean")
    steps = [r["step"] for r in metrics]
    window_steps = set(steps[-last_steps:] if last_steps else steps)
    recent = [r for r in metrics if r["step"] in window_steps]
    config, plan = records.config or {}, records.plan or {}
    summary: dict[str, Any] = {
        "run_dir": str(records.run_dir),
        "policy": plan.get("policy"),
        "mode": plan.get("mode"),
        "devices": len(plan["devices"]) if isinstance(plan.get("devices"), list) else None,
        "algorithm": (config.get("algorithm") or {}).get("name") if isinstance(config.get("algorithm"), dict) else None,
        "configured_steps": (config.get("train") or {}).get("steps") if isinstance(config.get("train"), dict) else None,
        "steps_logged": len(metrics),
        "last_step": steps[-1],
        "first_reward": rewards[0] if rewards else None,
        "final_reward": rewards[-1] if rewards else None,
        "metrics_steps": [recent[0]["step"], recent[-1]["step"]],
        "tokens_per_s": _mean(_series(recent, "tokens_per_s")[1]),
        "step_s": _mean(_series(recent, "time/step_s")[1]),
        "timeline": None,
        "notes": list(records.notes),
    }
    groups: list[tl.DeviceGroup] = []
    analysis = None
    if records.spans is not None:
        if records.plan is not None:
            names = [r["name"] for r in records.plan.get("roles", []) if isinstance(r, dict) and "name" in r]
            groups = tl.device_groups(records.plan, host_roles=host_roles(names) if host is None else host)
        window = tl.step_window(records.spans, last_steps or None, last_step=steps[-1])
        if window is None or window.wall <= 0:
            summary["notes"].append("trace.json has no spans of the logged steps: no timeline")
        else:
            analysis = tl.analyse(records.spans, groups, window)
            summary["timeline"] = analysis.to_json()
    return summary, analysis, groups


# -- plots --------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _integer_steps(ax) -> None:
    """Step axes get whole-number ticks only (steps are integers)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def reward_figure(metrics: Sequence[dict[str, Any]]):
    """The figure of ``reward.png``, or ``None`` without ``reward/mean``.

    No line marks the best achievable reward: neither the run directory nor the
    reward functions' specs record one.
    """
    xs, ys = _series(metrics, "reward/mean")
    if not xs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
    ax.plot(xs, ys, "o", ms=3, alpha=0.45, color="#4C72B0", label="reward/mean")
    ax.plot(xs, smooth(ys), "-", lw=2, color="#4C72B0", label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("reward/mean (per completion)")
    ax.set_title("Reward")
    _integer_steps(ax)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


def plot_reward(metrics: Sequence[dict[str, Any]], path: Path) -> Path | None:
    fig = reward_figure(metrics)
    return None if fig is None else _save(fig, path)


def losses_figure(metrics: Sequence[dict[str, Any]]):
    """The figure of ``losses.png``: a grid of the :func:`metric_panels`, or ``None`` when there are none."""
    panels = metric_panels(metrics)
    if not panels:
        return None
    plt = _pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    for i, (ax, panel) in enumerate(zip(axes.flat, panels)):
        for key in panel.keys:
            xs, ys = _series(metrics, key)
            ax.plot(xs, ys, "-", lw=1.5, marker="o" if len(xs) < 30 else None, ms=3, label=key)
        ax.set_title(panel.title, fontsize="medium")
        ax.set_ylabel(panel.ylabel, fontsize="small")
        _integer_steps(ax)
        ax.grid(alpha=0.3)
        if len(panel.keys) > 1:
            ax.legend(fontsize="x-small", loc="best")
        if i + cols >= len(panels):  # the lowest panel of its column
            ax.set_xlabel("step")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return fig


def plot_losses(metrics: Sequence[dict[str, Any]], path: Path) -> Path | None:
    fig = losses_figure(metrics)
    return None if fig is None else _save(fig, path)


#: Colours per role, in the order the timeline's rows list the roles: light
#: tints, so that the finer spans drawn on a role's bars in their kind's
#: (saturated) colour stand out, each bar outlined in a darker shade.
ROLE_COLOURS = ("#9EDAE5", "#F7B6D2", "#C5B0D5", "#FF9896", "#DBDB8D", "#98DF8A", "#C49C94", "#FFBB78",
                "#AEC7E8", "#C7C7C7", "#E5D8BD", "#CCEBC5")
#: The narrowest bar the timeline draws, as a share of the window: shorter spans
#: (a reward call of a millisecond) are widened to it so that they are seen.
MIN_SPAN_FRACTION = 0.004


def role_colours(roles: Iterable[str]) -> dict[str, str]:
    """A distinct colour for each role: :data:`ROLE_COLOURS` in order, then evenly spaced hues."""
    import colorsys

    roles = list(dict.fromkeys(roles))
    if len(roles) <= len(ROLE_COLOURS):
        return dict(zip(roles, ROLE_COLOURS))
    out = {}
    for i, r in enumerate(roles):
        red, green, blue = colorsys.hls_to_rgb(i / len(roles), 0.7, 0.6)
        out[r] = f"#{round(red * 255):02X}{round(green * 255):02X}{round(blue * 255):02X}"
    return out


def percent(fraction: float) -> str:
    """``fraction`` as a percentage that is never rounded to 0% or 100% unless exactly so."""
    if fraction <= 0 or fraction >= 1:
        return f"{fraction:.0%}"
    for digits in (0, 1):
        text = f"{fraction:.{digits}%}"
        if text not in (f"{0:.{digits}%}", f"{1:.{digits}%}"):
            return text
    return "<0.1%" if fraction < 0.5 else ">99.9%"


def _darker(colour: str, by: float = 0.6) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return tuple(c * by for c in to_rgb(colour))


def timeline_title(window: tl.Window, *, steps_logged: int | None = None) -> str:
    """Which steps the timeline shows, and how to see more when it shows fewer than were logged."""
    steps = window.steps
    if not steps:
        return "Timeline of the run"
    shown = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
    if steps_logged is None:
        return f"Timeline of {shown}"
    if len(steps) >= steps_logged:
        return f"Timeline of {shown} (all {steps_logged} steps)"
    return f"Timeline of {shown}, {len(steps)} of {steps_logged} steps (--last-steps N to show more, 0 for all)"


def timeline_figure(spans: Sequence[tl.Span], analysis: tl.TimelineSummary, *, steps_logged: int | None = None):
    """The figure of ``timeline.png``: one row per role under its device group's
    busy strip; time in seconds from the window start.

    A role's ``process`` and ``barrier`` spans are bars in the role's colour
    (:func:`role_colours`); the finer spans nested in them are drawn on top in
    their kind's colour (:func:`kind_colours`), ``barrier_wait`` hatched.
    Spans shorter than :data:`MIN_SPAN_FRACTION` of the window are widened to it.
    """
    from matplotlib.patches import Patch

    plt = _pyplot()
    window = analysis.window
    rows: list[tuple[str, str, Any]] = []  # (label, kind of row, role or group)
    for usage in analysis.groups:
        rows.append((f"{usage.group.name}\nidle {percent(usage.idle_fraction)}", "group", usage))
        for role in usage.group.roles:
            rows.append((role, "role", role))
    fig_h = 2.0 + 0.42 * len(rows)
    fig, ax = plt.subplots(figsize=(11, fig_h), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.15, h_pad=0.1)  # inches: labels keep clear of the figure's edge
    in_window = [s for s in spans if s.end > window.start and s.start < window.end]
    roles = [r for g in analysis.groups for r in g.group.roles]
    by_role = role_colours(roles)
    colours = kind_colours(s.name for s in in_window if s.name not in tl.OUTER)
    min_width = window.wall * MIN_SPAN_FRACTION

    def bar(start: float, end: float) -> tuple[float, float]:
        start, end = max(start, window.start) - window.start, min(end, window.end) - window.start
        width = max(end - start, min_width)
        return min(start, window.wall - width), width  # a widened span at the end stays inside the window

    used: dict[str, None] = {}
    drawn: set[str] = set()  # roles with process or barrier bars
    for y, (_, kind, what) in enumerate(rows):
        if kind == "group":
            busy = tl.busy_intervals(in_window, what.group.roles, window=window)
            ax.broken_barh([bar(s, e) for s, e in busy], (y - 0.2, 0.4), color="#333333")
            ax.axhline(y - 0.5, color="#999999", lw=0.8)
            continue
        mine = [s for s in in_window if s.role == what]
        outer = [bar(s.start, s.end) for s in mine if s.name in tl.OUTER]
        if outer:  # the role's whole stage calls, under the finer spans nested in them
            drawn.add(what)
            ax.broken_barh(outer, (y - 0.35, 0.7), facecolor=by_role[what], edgecolor=_darker(by_role[what]), lw=0.6)
        for s in mine:
            if s.name in tl.OUTER:
                continue
            hatch = KIND_HATCHES.get(s.name)
            ax.broken_barh([bar(s.start, s.end)], (y - 0.25, 0.5), facecolor=colours[s.name],
                           edgecolor="#888888" if hatch else "none", hatch=hatch, lw=0.3)
            used[s.name] = None
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows])
    for tick, (_, kind, _) in zip(ax.get_yticklabels(), rows):
        if kind == "group":
            tick.set_fontweight("bold")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, window.wall)
    ax.set_xlabel("seconds from the start of the window")
    ax.set_title(timeline_title(window, steps_logged=steps_logged))
    ax.grid(axis="x", alpha=0.3)
    role_handles = [Patch(facecolor=by_role[r], edgecolor=_darker(by_role[r]), lw=0.6, label=r)
                    for r in roles if r in drawn]
    role_handles.append(Patch(facecolor="#333333", label="device group busy (gaps: idle)"))
    order = list(KIND_COLOURS)
    kind_handles = [Patch(facecolor=colours[k], edgecolor="#888888" if k in KIND_HATCHES else "none",
                          hatch=KIND_HATCHES.get(k), label=k)
                    for k in sorted(used, key=lambda k: order.index(k) if k in order else len(order))]
    fig.legend(handles=role_handles, loc="outside lower left", ncol=min(len(role_handles), 4), fontsize="small",
               frameon=False, title="role (its process and barrier spans)", title_fontsize="small")
    if kind_handles:
        fig.legend(handles=kind_handles, loc="outside lower right", ncol=min(len(kind_handles), 4),
                   fontsize="small", frameon=False, title="spans inside them", title_fontsize="small")
    return fig


def plot_timeline(spans: Sequence[tl.Span], analysis: tl.TimelineSummary, path: Path, *,
                  steps_logged: int | None = None) -> Path:
    """Writes :func:`timeline_figure` to ``path``."""
    return _save(timeline_figure(spans, analysis, steps_logged=steps_logged), path)


#: At most this many episode lanes are drawn (the first ones).
MAX_LANES_SHOWN = 16
#: Span kinds drawn on episode lanes, outermost first, with their bar heights.
LANE_KINDS = {"episode": 0.8, "reset": 0.5, "generate": 0.5, "step": 0.5, "tool": 0.3}


def episode_lanes(spans: Sequence[tl.Span]) -> tuple[list[str], list[tl.Span]]:
    """The episode lanes of the trace and the spans on them of the last
    step's first item that has any (``([], [])`` for a run without episodes)."""
    lanes = [s for s in spans if is_detail_track(s.role) and s.role.split(DETAIL_SEPARATOR, 1)[1].startswith("episodes ")]
    if not lanes:
        return [], []
    last = max((s.segment, s.step if s.step is not None else -1) for s in lanes)
    mine = [s for s in lanes if (s.segment, s.step if s.step is not None else -1) == last]
    first_item = min((s.index for s in mine if s.index is not None), default=None)
    mine = [s for s in mine if s.index == first_item]
    def lane_number(track: str) -> tuple[int, str]:
        tail = track.rsplit(" ", 1)[-1]
        return (int(tail), track) if tail.isdigit() else (1 << 30, track)

    return sorted({s.role for s in mine}, key=lane_number), mine


def plot_episodes(spans: Sequence[tl.Span], path: Path) -> Path | None:
    """The episode lanes of one item (see :func:`episode_lanes`); ``None`` when there are none."""
    from matplotlib.patches import Patch

    lanes, mine = episode_lanes(spans)
    if not mine:
        return None
    total = len(lanes)
    lanes = lanes[:MAX_LANES_SHOWN]
    mine = [s for s in mine if s.role in lanes]
    plt = _pyplot()
    start, end = min(s.start for s in mine), max(s.end for s in mine)
    wall = max(end - start, 1e-9)
    min_width = wall / 800
    colours = {**kind_colours(["generate", "step", "tool", "reset"]), "episode": "#DDE5EE"}
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.32 * len(lanes)), layout="constrained")
    for kind, height in LANE_KINDS.items():
        for s in (s for s in mine if s.name == kind):
            y = lanes.index(s.role)
            ax.broken_barh([(s.start - start, max(s.end - s.start, min_width))], (y - height / 2, height),
                           facecolor=colours[kind], edgecolor="#888888" if kind == "episode" else "none", lw=0.4)
    ax.set_yticks(range(len(lanes)), [lane.split(DETAIL_SEPARATOR, 1)[1] for lane in lanes])
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlim(0, wall)
    ax.set_xlabel("seconds from the item's first episode")
    ref = mine[0]
    shown = f"{len(lanes)} of its {total} lanes" if total > len(lanes) else "one lane per episode slot"
    ax.set_title(f"Episodes of step {ref.step}, item {ref.index}: {shown}")
    ax.grid(axis="x", alpha=0.3)
    present = [k for k in LANE_KINDS if any(s.name == k for s in mine)]
    fig.legend(handles=[Patch(facecolor=colours[k], label=k) for k in present], loc="outside lower center",
               ncol=len(present), fontsize="small", frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- report.md ----------------------------------------------------------------------


def _num(value: Any, fmt: str = "{:.4g}") -> str:
    return "-" if value is None else fmt.format(value)


def _markdown(summary: dict[str, Any], analysis: tl.TimelineSummary | None, images: dict[str, Path | None],
              out_dir: Path) -> str:
    s = summary
    lines = [f"# Run report: {s['run_dir']}", ""]
    facts = [
        ("policy", s["policy"]), ("mode", s["mode"]), ("devices", s["devices"]), ("algorithm", s["algorithm"]),
        ("steps logged", f"{s['steps_logged']} (last step {s['last_step']}"
                         + (f", of {s['configured_steps']} configured)" if s["configured_steps"] else ")")),
        ("first reward/mean", _num(s["first_reward"])), ("final reward/mean", _num(s["final_reward"])),
    ]
    recent = s["metrics_steps"]
    over = f"mean over steps {recent[0]}-{recent[1]}" if recent[0] != recent[1] else f"step {recent[0]}"
    if s["tokens_per_s"] is not None:
        facts.append((f"tokens/s ({over})", _num(s["tokens_per_s"], "{:.0f}")))
    if s["step_s"] is not None:
        facts.append((f"step time, s ({over})", _num(s["step_s"], "{:.3g}")))
    lines += ["| | |", "|---|---|", *(f"| {k} | {'-' if v is None else v} |" for k, v in facts), ""]
    for title, key in (("Reward", "reward"), ("Losses", "losses"), ("Timeline", "timeline"), ("Episodes", "episodes")):
        if images.get(key) is not None:
            lines += [f"## {title}", "", f"![{title.lower()}]({images[key].relative_to(out_dir).as_posix()})", ""]
    if analysis is not None:
        w = analysis.window
        steps = f"steps {w.steps[0]}-{w.steps[-1]}" if len(w.steps) > 1 else f"step {w.steps[0]}"
        lines += [f"## Device groups ({steps}, {w.wall:.3g} s of wall time)", "",
                  ("Idle: the share of the window in which no role of the group had a busy span "
                   "(any span but `barrier_wait` and `device_wait`). Overlap: the roles' busy times summed, over the wall time. "
                   "Roles on the host form the `host` group; tracks that are no role of plan.json get a group "
                   "of their own."), "",
                  "| group | roles | busy s | idle fraction | overlap ratio |", "|---|---|---|---|---|"]
        for g in analysis.groups:
            lines.append(f"| {g.group.name} | {', '.join(g.group.roles)} | {g.busy_s:.3g} | "
                         f"{g.idle_fraction:.1%} | {g.overlap_ratio:.2f} |")
        present = {k for r in analysis.roles for k in r.by_kind if k not in tl.OUTER}
        kinds = [k for k in KIND_COLOURS if k in present] + sorted(present - set(KIND_COLOURS))
        lines += ["", "| role | group | busy s | busy share | " + " | ".join(f"{k} s" for k in kinds) + " |",
                  "|---|---|---|---|" + "---|" * len(kinds)]
        for r in analysis.roles:
            per_kind = " | ".join(_num(r.by_kind.get(k), "{:.3g}") for k in kinds)
            lines.append(f"| {r.role} | {r.group} | {r.busy_s:.3g} | {r.busy_fraction:.1%} | {per_kind} |")
        lines.append("")
    if s["notes"]:
        lines += ["## Notes", "", *(f"* {n}" for n in s["notes"]), ""]
    return "\n".join(lines)


def build_report(run_dir: str | Path, *, out_dir: str | Path | None = None,
                 last_steps: int | None = DEFAULT_LAST_STEPS, host: set[str] | None = None) -> Report:
    """Writes the report (see the module docstring) and returns its files and numbers.

    Args:
        out_dir: where to write (default ``RUN_DIR/report``).
        last_steps: the steps the timeline and the idle fractions cover (``None`` or 0: all).
        host: roles to count as host roles (default: those whose plugin says so).
    """
    if last_steps is not None and last_steps < 0:
        raise ValueError(f"last_steps must be at least 0, got {last_steps}")
    records = read_run(run_dir)
    out = Path(out_dir) if out_dir is not None else records.run_dir / "report"
    summary, analysis, _ = summarize(records, last_steps=last_steps, host=host)
    md = out / "report.md"
    try:
        out.mkdir(parents=True, exist_ok=True)
        images = {
            "reward": plot_reward(records.metrics, out / "reward.png"),
            "losses": plot_losses(records.metrics, out / "losses.png"),
            "timeline": (plot_timeline(records.spans, analysis, out / "timeline.png",
                                       steps_logged=len(records.metrics)) if analysis else None),
            "episodes": plot_episodes(records.spans or [], out / "episodes.png"),
        }
        md.write_text(_markdown(summary, analysis, images, out))
    except OSError as exc:
        raise RunDirError(f"{out}: cannot write the report there ({exc.strerror or exc})") from None
    files = tuple(p for p in images.values() if p is not None) + (md,)
    summary["files"] = [str(p) for p in files]
    return Report(files=files, summary=summary, notes=tuple(summary["notes"]))


def write_report(run_dir: str | Path, *, out_dir: str | Path | None = None,
                 last_steps: int | None = DEFAULT_LAST_STEPS) -> list[Path]:
    """Writes ``reward.png``, ``losses.png``, ``timeline.png``, ``episodes.png``
    (agentic runs) and ``report.md`` for ``run_dir`` (into ``RUN_DIR/report/`` unless ``out_dir``); returns the files written.

    Raises:
        RunDirError: no such directory, no metrics, or a malformed ``plan.json``/``trace.json``.
    """
    return list(build_report(run_dir, out_dir=out_dir, last_steps=last_steps).files)
