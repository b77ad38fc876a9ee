"""``rlpipe report`` on hand-made run directories: plots, report.md, --json, errors."""

import json
import re

import pytest
from click.testing import CliRunner

from rlpipe.app import timeline as tl
from rlpipe.app.report import (
    MIN_SPAN_FRACTION,
    episode_lanes,
    losses_figure,
    metric_panels,
    percent,
    read_metrics,
    reward_figure,
    role_colours,
    smooth,
    timeline_figure,
    write_report,
)
from rlpipe.cli.main import cli
from rlpipe.core.errors import RunDirError
from rlpipe.runtime.trace import Trace, detail_track

S = 1e6
PNG = b"\x89PNG\r\n\x1a\n"


def role(name, devices, colocated=()):
    return {"name": name, "devices": devices, "mesh": {"shape": [len(devices), 1], "axes": ["fsdp", "tp"]},
            "colocated_with": list(colocated), "offload": False, "memory_estimate_bytes": None}


PLAN = {
    "devices": list(range(8)), "policy": "default", "mode": "disaggregated",
    "roles": [role("rollout", [4, 5, 6, 7]), role("reward", [0, 1, 2, 3], ["reference", "trainer"]),
              role("reference", [0, 1, 2, 3], ["reward", "trainer"]), role("trainer", [0, 1, 2, 3], ["reward", "reference"])],
    "boundaries": [{"from": "rollout", "to": "reward", "blocking": False}],
}


def metrics_row(step):
    return {"step": step, "time/step_s": 2.0, "loss": 0.5 - 0.1 * step, "pg_loss": 0.4 - 0.1 * step, "kl": 0.01 * step,
            "critic/value_loss": 1.0 / (step + 1), "clip_frac_low": 0.1, "reward/mean": 0.1 * step,
            "tokens_per_s": 1000.0 + step, "policy_version": step + 1}


def trace_doc(steps):
    """Rollout on its own devices generating step s+1 while the trainer trains step s."""
    trace = Trace()
    for s in range(steps):
        t = 2.0 * s
        trace.complete("rollout", "process", t * S, (t + 1.5) * S, step=s, index=0)
        trace.complete("rollout", "generate", (t + 0.1) * S, (t + 1.4) * S, step=s, index=0)
        trace.complete("reward", "process", (t + 1.5) * S, (t + 1.6) * S, step=s, index=0)
        trace.complete("reference", "process", (t + 1.6) * S, (t + 1.8) * S, step=s, index=0)
        trace.complete("reference", "logprobs", (t + 1.6) * S, (t + 1.8) * S, step=s, index=0)
        trace.complete("trainer", "barrier_wait", (t + 1.0) * S, (t + 1.8) * S, step=s)
        trace.complete("trainer", "barrier", (t + 1.8) * S, (t + 3.0) * S, step=s, policy_version=s)
        trace.complete("trainer", "train", (t + 1.8) * S, (t + 2.8) * S, step=s, policy_version=s)
        trace.complete("trainer", "weight_sync", (t + 2.8) * S, (t + 3.0) * S, step=s, policy_version=s)
        trace.instant("source", "global_batch", step=s)
    return trace.to_chrome()


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.yaml").write_text("algorithm:\n  name: grpo\ntrain:\n  steps: 8\n")
    (d / "plan.json").write_text(json.dumps(PLAN))
    (d / "metrics.jsonl").write_text("".join(json.dumps(metrics_row(s)) + "\n" for s in range(8)))
    (d / "trace.json").write_text(json.dumps(trace_doc(8)))
    return d


def invoke(*args):
    return CliRunner().invoke(cli, ["report", *map(str, args)])


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 2000, path


@pytest.mark.slow
def test_write_report_writes_three_plots_and_a_page_into_run_dir_report(run_dir):
    files = write_report(run_dir)
    assert [f.name for f in files] == ["reward.png", "losses.png", "timeline.png", "report.md"]
    assert all(f.parent == run_dir / "report" for f in files)
    for f in files[:3]:
        assert_png(f)
    md = (run_dir / "report" / "report.md").read_text()
    for name in ("reward.png", "losses.png", "timeline.png"):
        assert f"]({name})" in md
    assert "disaggregated" in md and "grpo" in md


def test_an_agentic_run_gets_a_picture_of_its_episode_lanes_which_are_not_roles(run_dir):
    doc = trace_doc(8)
    lanes = Trace()
    for s in (6, 7):  # two episodes a lane in the last steps, with their turns and a tool call
        t = 2.0 * s
        for lane in range(3):
            track = detail_track("rollout", f"episodes {lane:02d}")
            for k, start in enumerate((t + 0.1, t + 0.8)):
                lanes.complete(track, "episode", start * S, (start + 0.6) * S, step=s, index=0, episode=2 * lane + k)
                lanes.complete(track, "generate", (start + 0.1) * S, (start + 0.3) * S, step=s, index=0)
                lanes.complete(track, "step", (start + 0.3) * S, (start + 0.5) * S, step=s, index=0)
                lanes.complete(track, "tool", (start + 0.35) * S, (start + 0.45) * S, step=s, index=0)
    extra = lanes.to_chrome()["traceEvents"]
    tids = {e["tid"] for e in doc["traceEvents"]}
    shift = max(tids) + 1  # the lanes' tracks after the roles'
    doc["traceEvents"] += [{**e, "tid": e["tid"] + shift} for e in extra]
    (run_dir / "trace.json").write_text(json.dumps(doc))
    lane_names, spans = episode_lanes(tl.load_trace(run_dir / "trace.json"))
    assert lane_names == [f"rollout/episodes {k:02d}" for k in range(3)]
    assert {s.step for s in spans} == {7} and sum(s.name == "episode" for s in spans) == 6
    files = write_report(run_dir, last_steps=3)
    assert [f.name for f in files] == ["reward.png", "losses.png", "timeline.png", "episodes.png", "report.md"]
    assert_png(run_dir / "report" / "episodes.png")
    md = (run_dir / "report" / "report.md").read_text()
    assert "](episodes.png)" in md and "episodes 0" not in md  # the lanes are no role or group of the tables


def test_report_md_gives_each_device_group_an_idle_fraction(run_dir):
    write_report(run_dir, last_steps=3)
    md = (run_dir / "report" / "report.md").read_text()
    rows = {m.group(1): (m.group(2), float(m.group(3))) for m in
            re.finditer(r"^\| (devices [\d,-]+|host) \| ([^|]+) \| [\d.e+-]+ \| ([\d.]+)% \|", md, re.MULTILINE)}
    assert set(rows) == {"devices 0-3", "devices 4-7", "host"}
    assert rows["devices 0-3"][0].strip() == "reference, trainer"
    assert rows["host"][0].strip() == "reward"  # the reward role works on the host, whatever devices it is listed on
    assert "steps 5-7" in md
    for name in ("rollout", "reward", "reference", "trainer"):
        assert re.search(rf"^\| {name} \| ", md, re.MULTILINE)


def test_json_prints_the_summary_numbers(run_dir, tmp_path):
    out = tmp_path / "elsewhere"
    r = invoke(run_dir, "--out", out, "--last-steps", "2", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mode"] == "disaggregated" and doc["steps_logged"] == 8 and doc["last_step"] == 7
    assert doc["first_reward"] == 0.0 and doc["final_reward"] == pytest.approx(0.7)
    assert doc["tokens_per_s"] == pytest.approx(1006.5)  # mean over the window's steps 6 and 7
    timeline = doc["timeline"]
    assert timeline["window"]["steps"] == [6, 7]
    groups = {g["name"]: g for g in timeline["groups"]}
    # the window runs from step 6's first work to step 7's last: 12.0-17.0 s; on devices 0-3 the
    # trainer finishing step 5 (12.0-13.0), then reference and trainer of steps 6 and 7 (1.4 s each)
    assert timeline["window"]["start_s"] == pytest.approx(12.0) and timeline["window"]["end_s"] == pytest.approx(17.0)
    assert groups["devices 0-3"]["busy_s"] == pytest.approx(1.0 + 1.4 + 1.4)
    assert groups["devices 0-3"]["idle_fraction"] == pytest.approx(1 - 3.8 / 5.0)
    assert groups["devices 0-3"]["overlap_ratio"] == pytest.approx(3.8 / 5.0)
    assert groups["devices 4-7"]["idle_fraction"] == pytest.approx(1 - 3.0 / 5.0)
    assert sorted(p.rsplit("/", 1)[-1] for p in doc["files"]) == ["losses.png", "report.md", "reward.png", "timeline.png"]
    assert (out / "timeline.png").exists() and not (run_dir / "report").exists()


def test_plain_output_lists_the_files_written(run_dir):
    r = invoke(run_dir)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == [str(run_dir / "report" / n) for n in
                                     ("reward.png", "losses.png", "timeline.png", "report.md")]


def test_a_crashed_run_without_trace_and_with_a_cut_line_is_reported_with_notes(run_dir):
    (run_dir / "trace.json").unlink()
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "loss": 0.')
    r = invoke(run_dir)
    assert r.exit_code == 0, r.stderr
    assert [p.rsplit("/", 1)[-1] for p in r.stdout.splitlines()] == ["reward.png", "losses.png", "report.md"]
    assert "skipped 1 unreadable line(s) (line 9)" in r.stderr and "no trace.json" in r.stderr
    assert "no trace.json" in (run_dir / "report" / "report.md").read_text()


def test_a_resumed_run_keeps_the_last_row_of_a_repeated_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in [(0, 1.0), (1, 2.0), (1, 3.0), (2, 4.0)]))
    rows, notes = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 1.0), (1, 3.0), (2, 4.0)]
    assert "logged more than once" in notes[0]


def test_metric_panels_draw_losses_kl_entropy_grad_norm_and_clip_fractions_present():
    rows = [{**metrics_row(s), "ppo_kl": 0.01, "entropy": 3.0, "grad_norm": 0.5, "clip_frac_high": 0.2,
             "ratio_max": 2.0, "tokens_per_s": 10.0} for s in range(3)]
    panels = metric_panels(rows)
    assert [p.keys for p in panels] == [("loss", "pg_loss"), ("critic/value_loss",), ("kl", "ppo_kl"), ("entropy",),
                                        ("grad_norm",), ("clip_frac_low", "clip_frac_high")]
    assert [p.title for p in panels][:2] == ["loss, pg_loss", "critic/value_loss"]
    assert [p.ylabel for p in panels] == ["loss (unitless)", "value loss (reward²)", "KL (nats/token)",
                                          "entropy (nats/token)", "grad norm (L2, before clipping)",
                                          "clip fraction (share of tokens)"]
    # only the quantities whose keys are there; non-finite values count as absent
    assert [p.keys for p in metric_panels([{"step": 0, "loss": 1.0, "grad_norm": float("nan")}])] == [("loss",)]
    assert metric_panels([{"step": 0, "reward/mean": 1.0}]) == []


def _step_ticks_are_whole(ax):
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def test_losses_png_has_a_titled_and_y_labelled_panel_per_quantity_with_whole_step_ticks(run_dir):
    rows = [{**metrics_row(s), "entropy": 3.0 - 0.1 * s, "grad_norm": 0.5} for s in range(3)]
    fig = losses_figure(rows)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["loss, pg_loss", "critic/value_loss", "kl", "entropy", "grad_norm",
                                               "clip_frac_low"]
    assert all(ax.get_ylabel() for ax in axes)
    assert all(_step_ticks_are_whole(ax) for ax in axes)  # three steps: matplotlib would tick 0.25, 0.5, ...
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["loss", "pg_loss"]
    assert losses_figure([{"step": 0, "reward/mean": 1.0}]) is None


def test_reward_png_ticks_whole_steps():
    fig = reward_figure([metrics_row(s) for s in range(3)])
    (ax,) = fig.axes
    assert _step_ticks_are_whole(ax) and ax.get_xlabel() == "step" and ax.get_ylabel().startswith("reward/mean")


def test_smooth_is_a_trailing_mean():
    assert smooth([0, 2, 4, 6], window=2) == [0, 1, 3, 5]


@pytest.mark.parametrize("make, why", [
    (lambda d: d / "absent", "no such run directory"),
    (lambda d: d, "no metrics.jsonl"),
    (lambda d: (d / "metrics.jsonl").write_text("garbage\n") and d, "no metrics rows"),
    (lambda d: [(d / "metrics.jsonl").write_text('{"step": 0}\n'), (d / "trace.json").write_text("{oops")] and d,
     "trace.json: not JSON at line 1"),
    (lambda d: [(d / "metrics.jsonl").write_text('{"step": 0}\n'), (d / "plan.json").write_text("[]")] and d,
     "plan.json: expected a JSON object"),
    (lambda d: [(d / "metrics.jsonl").write_text('{"step": 0}\n'),
                (d / "plan.json").write_text('{"roles": [{"name": "trainer"}, {"devices": [0]}]}')] and d,
     "plan.json: 'roles' must be a list of objects"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 0}\n') and d / "metrics.jsonl", "not a directory"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, make, why):
    r = invoke(make(tmp_path))
    assert r.exit_code == 2
    assert r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith("error: ") and why in line


def test_an_output_path_that_cannot_be_a_directory_is_one_error_line(run_dir):
    (run_dir / "taken").write_text("a file")
    r = invoke(run_dir, "--out", run_dir / "taken")
    assert r.exit_code == 2
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"error: {run_dir / 'taken'}: cannot write the report there")


def test_write_report_raises_run_dir_error(tmp_path):
    with pytest.raises(RunDirError, match="no such run directory"):
        write_report(tmp_path / "absent")


# -- timeline.png -------------------------------------------------------------------


def _bars(ax):
    """(left, width, y centre, face colour) of every bar drawn on ``ax``."""
    from matplotlib.colors import to_hex

    out = []
    for coll in ax.collections:
        colours = coll.get_facecolors()
        for i, path in enumerate(coll.get_paths()):
            (x0, y0), (x1, y1) = path.get_extents().get_points()
            out.append((x0, x1 - x0, (y0 + y1) / 2, to_hex(colours[i % len(colours)])))
    return out


def _timeline(run_dir, last_steps=3, plan=PLAN):
    from rlpipe.app.report import read_run, summarize

    (run_dir / "plan.json").write_text(json.dumps(plan))
    records = read_run(run_dir)
    _, analysis, _ = summarize(records, last_steps=last_steps, host={"reward"})
    return timeline_figure(records.spans, analysis, steps_logged=len(records.metrics)), analysis


def test_timeline_title_says_which_steps_it_shows_and_how_to_see_more(run_dir):
    fig, _ = _timeline(run_dir, last_steps=3)
    assert fig.axes[0].get_title() == "Timeline of steps 5-7, 3 of 8 steps (--last-steps N to show more, 0 for all)"
    fig, _ = _timeline(run_dir, last_steps=None)
    assert fig.axes[0].get_title() == "Timeline of steps 0-7 (all 8 steps)"


def test_the_option_the_title_names_is_in_report_help():
    r = invoke("--help")
    assert r.exit_code == 0 and "--last-steps" in r.stdout


def test_timeline_labels_name_device_groups_and_give_an_idle_share_that_is_never_rounded_away(run_dir):
    one_device = {**PLAN, "roles": [role("rollout", [0]), role("reward", [0]), role("reference", [0]),
                                    role("trainer", [0])]}
    fig, analysis = _timeline(run_dir, plan=one_device)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0].startswith("device 0\nidle ") and "devices 0" not in labels[0]
    host = next(g for g in analysis.groups if g.group.name == "host")
    assert 0 < host.idle_fraction < 1 and f"host\nidle {percent(host.idle_fraction)}" in labels
    fig, _ = _timeline(run_dir)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert [label.split("\n")[0] for label in labels if "idle" in label] == ["devices 0-3", "devices 4-7", "host"]


def test_percent_is_exact_at_the_ends_and_never_rounds_a_little_work_to_100_percent():
    assert [percent(x) for x in (0.0, 1.0, 0.5, 0.999, 0.9999999, 0.003, 1e-9)] == [
        "0%", "100%", "50%", "99.9%", ">99.9%", "0.3%", "<0.1%"]


def test_every_role_has_its_own_colour_and_a_legend_entry(run_dir):
    fig, _ = _timeline(run_dir)
    ax = fig.axes[0]
    colours = role_colours(["reference", "trainer", "rollout", "reward"])
    assert len(set(colours.values())) == 4
    rows = [t.get_text() for t in ax.get_yticklabels()]
    drawn = {}
    for _, _, y, colour in _bars(ax):
        drawn.setdefault(rows[round(y)], set()).add(colour)
    for name, colour in colours.items():
        assert colour.lower() in drawn[name]  # its process / barrier bars
    legend_labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert {"reference", "trainer", "rollout", "reward", "generate", "logprobs", "train"} <= set(legend_labels)
    many = role_colours([f"role{i}" for i in range(30)])  # more roles than the palette: still distinct
    assert len(set(many.values())) == 30


def test_a_span_of_a_millisecond_is_drawn_wide_enough_to_be_seen(run_dir):
    doc = trace_doc(8)
    extra = Trace()
    extra.complete("plugin", "process", 15.0 * S, 15.001 * S, step=7, index=0)
    extra.complete("plugin", "process", 16.9995 * S, 17.0 * S, step=7, index=1)  # at the window's very end
    tid = max(e["tid"] for e in doc["traceEvents"]) + 1
    doc["traceEvents"] += [{**e, "tid": tid} for e in extra.to_chrome()["traceEvents"]]
    (run_dir / "trace.json").write_text(json.dumps(doc))
    fig, analysis = _timeline(run_dir, plan={**PLAN, "roles": [*PLAN["roles"], role("plugin", [4, 5, 6, 7])]})
    ax = fig.axes[0]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    wall = analysis.window.wall
    plugin = [b for b in _bars(ax) if rows[round(b[2])] == "plugin"]
    assert len(plugin) == 2
    assert all(width >= MIN_SPAN_FRACTION * wall * 0.999 for _, width, _, _ in plugin)
    assert all(left + width <= wall + 1e-9 for left, width, _, _ in plugin)  # widened inside the window
