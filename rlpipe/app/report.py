"""``rlpipe report``: plots and a one-page summary of a run directory.

:func:`write_report` reads ``metrics.jsonl``, ``plan.json``, ``config.yaml`` and
``trace.json`` and writes, into ``RUN_DIR/report/`` by default:

* ``reward.png``: ``reward/mean`` per step with a smoothed line;
* ``losses.png``: every loss-like metric (``loss``, ``pg_loss``, ``kl``,
  ``critic/value_loss``, ...), one panel each;
* ``timeline.png``: the last steps, one row per role grouped by device group,
  spans coloured by kind, and each group's busy time as a strip whose gaps are
  its idle bubbles;
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
}
#: Colours for span kinds without one of their own, in order of appearance.
OTHER_COLOURS = ("#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD", "#E377C2", "#17BECF")


def kind_colours(kinds: Iterable[str]) -> dict[str, str]:
    """A colour for each span kind: its own, or the next of :data:`OTHER_COLOURS`."""
    out, extra = {}, 0
    for kind in dict.fromkeys(kinds):
        if kind in KIND_COLOURS:
            out[kind] = KIND_COLOURS[kind]
        else:
            out[kind] = OTHER_COLOURS[extra % len(OTHER_COLOURS)]
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


def loss_keys(metrics: Sequence[dict[str, Any]]) -> list[str]:
    """Loss-like metric names present: any whose last ``/`` part contains ``loss``
    or starts with ``kl`` (``loss``, ``pg_loss``, ``kl``, ``critic/value_loss``)."""
    keys: dict[str, None] = {}
    for row in metrics:
        for k, v in row.items():
            leaf = k.rsplit("/", 1)[-1]
            if ("loss" in leaf or leaf.startswith("kl")) and _finite(v):
                keys[k] = None
    return sorted(keys, key=lambda k: (k != "loss", "/" in k, k))


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


def plot_reward(metrics: Sequence[dict[str, Any]], path: Path) -> Path | None:
    xs, ys = _series(metrics, "reward/mean")
    if not xs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
    ax.plot(xs, ys, "o", ms=3, alpha=0.45, color="#4C72B0", label="reward/mean")
    ax.plot(xs, smooth(ys), "-", lw=2, color="#4C72B0", label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("reward/mean")
    ax.set_title("Reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(metrics: Sequence[dict[str, Any]], path: Path) -> Path | None:
    keys = loss_keys(metrics)
    if not keys:
        return None
    plt = _pyplot()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False, sharex=True,
                             layout="constrained")
    for ax, key in zip(axes.flat, keys):
        xs, ys = _series(metrics, key)
        ax.plot(xs, ys, "-", lw=1.5, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_title(key, fontsize="medium")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(spans: Sequence[tl.Span], analysis: tl.TimelineSummary, path: Path) -> Path:
    """One row per role under its device group's busy strip; time in seconds from the window start."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    window = analysis.window
    rows: list[tuple[str, str, Any]] = []  # (label, kind of row, role or group)
    for usage in analysis.groups:
        rows.append((f"{usage.group.name} (idle {usage.idle_fraction:.0%})", "group", usage))
        for role in usage.group.roles:
            rows.append((role, "role", role))
    fig_h = 1.6 + 0.42 * len(rows)
    fig, ax = plt.subplots(figsize=(11, fig_h), layout="constrained")
    in_window = [s for s in spans if s.end > window.start and s.start < window.end]
    colours = kind_colours(s.name for s in in_window)
    min_width = window.wall / 800  # about a pixel: a span of a millisecond stays visible
    used: dict[str, None] = {}
    for y, (_, kind, what) in enumerate(rows):
        if kind == "group":
            busy = tl.busy_intervals(in_window, what.group.roles, window=window)
            ax.broken_barh([(s - window.start, max(e - s, min_width)) for s, e in busy], (y - 0.2, 0.4),
                           color="#333333")
            ax.axhline(y - 0.5, color="#999999", lw=0.8)
            continue
        mine = [s for s in in_window if s.role == what]
        # Outer spans (process, barrier) first, the finer spans nested in them on top.
        for layer in (lambda s: s.name in tl.OUTER, lambda s: s.name not in tl.OUTER):
            for s in filter(layer, mine):
                start, end = max(s.start, window.start), min(s.end, window.end)
                end = max(end, start + min_width)
                outer = s.name in tl.OUTER
                height = 0.7 if outer else 0.5
                hatch = "////" if s.name == "barrier_wait" else None
                ax.broken_barh([(start - window.start, end - start)], (y - height / 2, height),
                               facecolor=colours[s.name],
                               edgecolor="#888888" if hatch else "none", hatch=hatch, lw=0.3)
                used[s.name] = None
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows])
    for tick, (_, kind, _) in zip(ax.get_yticklabels(), rows):
        if kind == "group":
            tick.set_fontweight("bold")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, window.wall)
    ax.set_xlabel("seconds from the start of the window")
    steps = window.steps
    span_text = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}" if steps else "the run"
    ax.set_title(f"Timeline of {span_text}")
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(facecolor=colours[k], edgecolor="#888888" if k == "barrier_wait" else "none",
                     hatch="////" if k == "barrier_wait" else None, label=k)
               for k in sorted(used, key=lambda k: list(KIND_COLOURS).index(k) if k in KIND_COLOURS else len(KIND_COLOURS))]
    handles.append(Patch(facecolor="#333333", label="group busy (gaps: idle)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), fontsize="small", frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
                  "Idle: the share of the window in which no role of the group had a busy span "
                  "(any span but `barrier_wait`). Overlap: the roles' busy times summed, over the wall time. "
                  "Roles on the host form the `host` group; tracks that are no role of plan.json get a group "
                  "of their own.", "",
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
            "timeline": plot_timeline(records.spans, analysis, out / "timeline.png") if analysis else None,
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
