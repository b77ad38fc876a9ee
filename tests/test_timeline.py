"""Trace analysis on hand-made timelines: interval unions, idle fractions, overlap."""

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlpipe.app import timeline as tl
from rlpipe.core.errors import TraceError, UsageError
from rlpipe.runtime.trace import Trace

S = 1e6  # microseconds per second


def chrome(spans):
    """A trace document written by rlpipe's own Trace: (role, name, start_s, end_s, step)."""
    trace = Trace()
    for role, name, start, end, step in spans:
        trace.complete(role, name, start * S, end * S, step=step, policy_version=step)
    trace.instant("source", "global_batch", step=0)
    return trace.to_chrome()


def spans_of(spans):
    return tl.parse_trace(chrome(spans))


# -- intervals ----------------------------------------------------------------------


def test_union_merges_overlapping_nested_and_touching_intervals_and_drops_empty_ones():
    assert tl.union([(5, 6), (0, 2), (1, 3), (3, 4), (0.5, 1), (7, 7)]) == [(0, 4), (5, 6)]
    assert tl.union([]) == []


def test_length_counts_overlaps_twice_and_union_once():
    intervals = [(0, 2), (1, 3)]
    assert tl.length(intervals) == 4
    assert tl.length(tl.union(intervals)) == 3


def test_clip_and_gaps_give_the_idle_bubbles_of_a_window():
    busy = [(1, 2), (1.5, 3), (5, 9)]
    assert tl.clip(busy, 2, 6) == [(2, 3), (5, 6)]
    assert tl.gaps(busy, 0, 8) == [(0, 1), (3, 5)]
    assert tl.gaps([], 0, 1) == [(0, 1)]


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), max_size=12))
def test_union_covers_exactly_the_unit_cells_its_intervals_cover(pairs):
    intervals = [(min(a, b), max(a, b)) for a, b in pairs]
    cells = {c for s, e in intervals for c in range(s, e)}
    merged = tl.union(intervals)
    assert tl.length(merged) == len(cells)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(merged))  # disjoint, sorted, not touching


intervals_ = st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)).map(sorted).map(tuple), max_size=8)


@given(intervals_, intervals_)
def test_intersect_and_subtract_cover_the_cells_of_the_set_operations(a, b):
    def cells(intervals):
        return {c for s, e in intervals for c in range(s, e)}

    both, rest = tl.intersect(a, b), tl.subtract(a, b)
    assert cells(both) == cells(a) & cells(b) and tl.length(both) == len(cells(a) & cells(b))
    assert cells(rest) == cells(a) - cells(b) and tl.length(rest) == len(cells(a) - cells(b))
    assert all(x[1] <= y[0] for x, y in itertools.pairwise(rest))


# -- reading ------------------------------------------------------------------------


def test_parse_trace_names_spans_after_their_track_and_reads_step_and_seconds():
    spans = spans_of([("rollout", "process", 0.0, 2.0, 0), ("rollout", "generate", 0.5, 1.5, 0),
                      ("trainer", "train", 2.0, 3.0, 0)])
    assert [(s.role, s.name, s.start, s.end, s.step) for s in spans] == [
        ("rollout", "process", 0.0, 2.0, 0), ("rollout", "generate", 0.5, 1.5, 0), ("trainer", "train", 2.0, 3.0, 0)]
    assert all(s.policy_version == 0 for s in spans)  # instants are not spans


def test_load_trace_reads_a_file_written_by_trace(tmp_path):
    trace = Trace()
    trace.complete("trainer", "train", 0, 1 * S, step=0)
    trace.write(tmp_path / "trace.json")
    (span,) = tl.load_trace(tmp_path / "trace.json")
    assert (span.role, span.name, span.duration) == ("trainer", "train", 1.0)


def test_load_trace_accepts_an_unterminated_event_array(tmp_path):
    events = chrome([("trainer", "train", 0, 1, 0)])["traceEvents"]
    (tmp_path / "t.json").write_text("[" + ",\n".join(json.dumps(e) for e in events) + ",\n")
    assert [s.name for s in tl.load_trace(tmp_path / "t.json")] == ["train"]


def test_appended_trace_documents_become_consecutive_segments(tmp_path):
    first = chrome([("trainer", "train", 0, 2, 0), ("trainer", "train", 2, 4, 1)])
    second = chrome([("trainer", "train", 0, 1, 1), ("trainer", "train", 1, 3, 2)])  # resumed: redoes step 1
    (tmp_path / "t.json").write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
    spans = tl.load_trace(tmp_path / "t.json")
    assert [(s.segment, s.start, s.end) for s in spans] == [(0, 0, 2), (0, 2, 4), (1, 4, 5), (1, 5, 7)]
    window = tl.step_window(spans, last_steps=2)
    assert window.steps == (1, 2) and (window.start, window.end) == (4, 7)


@pytest.mark.parametrize("text, why", [
    ("", "empty file"),
    ("{\"traceEvents\": [", "not JSON at line 1"),
    ("{\"events\": []}", "'traceEvents' list"),
    ("{\"traceEvents\": [{\"ph\": \"X\", \"name\": \"train\", \"ts\": \"soon\"}]}", "numeric 'ts' and 'dur'"),
    ("42", "expected a trace object"),
])
def test_a_malformed_trace_is_a_usage_error_naming_the_file_and_why(tmp_path, text, why):
    path = tmp_path / "trace.json"
    path.write_text(text)
    with pytest.raises(TraceError) as info:
        tl.load_trace(path)
    assert isinstance(info.value, UsageError)
    assert str(path) in str(info.value) and why in str(info.value) and len(info.value.lines()) == 1


def test_a_missing_trace_is_a_trace_error(tmp_path):
    with pytest.raises(TraceError, match="no such file"):
        tl.load_trace(tmp_path / "trace.json")


# -- groups -------------------------------------------------------------------------


def role(name, devices):
    return {"name": name, "devices": devices, "mesh": {"shape": [len(devices)], "axes": ["fsdp"]},
            "colocated_with": [], "offload": False, "memory_estimate_bytes": None}


def test_device_groups_join_roles_sharing_devices_transitively_and_put_host_roles_last():
    plan = {"roles": [role("rollout", [4, 5, 6, 7]), role("reward", [0, 1, 2, 3]), role("reference", [0, 1]),
                      role("trainer", [1, 2, 3]), role("judge", [])]}
    groups = tl.device_groups(plan, host_roles={"reward"})
    assert [(g.name, g.devices, g.roles) for g in groups] == [
        ("devices 0-3", (0, 1, 2, 3), ("reference", "trainer")),
        ("devices 4-7", (4, 5, 6, 7), ("rollout",)),
        ("host", (), ("reward", "judge")),
    ]
    # a role bridging two groups merges them
    bridged = tl.device_groups({"roles": [role("a", [0]), role("b", [2]), role("c", [0, 2])]})
    assert [(g.name, set(g.roles)) for g in bridged] == [("devices 0,2", {"a", "b", "c"})]


def test_a_group_of_one_device_is_named_device_in_the_singular():
    groups = tl.device_groups({"roles": [role("trainer", [0]), role("rollout", [0]), role("reward", [0])]},
                              host_roles={"reward"})
    assert [g.name for g in groups] == ["device 0", "host"]


@pytest.mark.parametrize("ids, label", [
    ([3], "device 3"), ([0, 1], "devices 0,1"), ([3, 0, 2, 1], "devices 0-3"), ([0, 2, 5], "devices 0,2,5"),
    ([0, 1, 2, 5, 6, 7], "devices 0-2,5-7"), ([0, 1, 2, 4, 5], "devices 0-2,4,5"),
])
def test_device_label_names_runs_of_three_or_more_as_ranges(ids, label):
    assert tl.device_label(ids) == label


# -- windows and busy time ------------------------------------------------------------


# Two colocated roles taking turns on one device group over two steps, with
# the trainer waiting at the barrier and a bubble in each step:
#   step 0: rollout 0-2 (generate 0.5-2 nested), trainer waits 1-3, trains 3-4, idle 4-5
#   step 1: rollout 5-7, trainer waits 6-8, trains 8-9, weight_sync 9-9.5
COLOCATED = [
    ("rollout", "process", 0, 2, 0), ("rollout", "generate", 0.5, 2, 0),
    ("trainer", "barrier_wait", 1, 3, 0), ("trainer", "barrier", 3, 4, 0), ("trainer", "train", 3, 4, 0),
    ("rollout", "process", 5, 7, 1), ("rollout", "generate", 5, 7, 1),
    ("trainer", "barrier_wait", 6, 8, 1), ("trainer", "barrier", 8, 9.5, 1), ("trainer", "train", 8, 9, 1),
    ("trainer", "weight_sync", 9, 9.5, 1),
]


def test_step_window_spans_the_busy_work_of_the_last_steps():
    spans = spans_of(COLOCATED)
    assert tl.step_window(spans) == tl.Window(0, 9.5, (0, 1))
    assert tl.step_window(spans, last_steps=1) == tl.Window(5, 9.5, (1,))
    assert tl.step_window(spans, last_steps=5, last_step=0) == tl.Window(0, 4, (0,))
    assert tl.step_window(spans_of([("trainer", "barrier_wait", 0, 1, 0)])) is None  # waiting is not work


def test_idle_fraction_counts_time_no_role_of_the_group_is_busy_and_ignores_barrier_waits():
    spans = spans_of(COLOCATED)
    window = tl.step_window(spans)
    # busy: 0-2, 3-4, 5-7, 8-9.5 -> 6.5 of 9.5 s; the trainer's waits fill no bubble
    assert tl.busy_intervals(spans, ["rollout", "trainer"], window=window) == [(0, 2), (3, 4), (5, 7), (8, 9.5)]
    assert tl.idle_fraction(spans, ["rollout", "trainer"], window) == pytest.approx(3 / 9.5)
    assert tl.idle_fraction(spans, ["trainer"], window) == pytest.approx(1 - 2.5 / 9.5)


def test_overlap_ratio_sums_busy_roles_so_parallel_work_exceeds_one():
    spans = spans_of([("rollout", "generate", 0, 4, 0), ("trainer", "train", 2, 4, 0), ("trainer", "train", 4, 5, 1)])
    window = tl.Window(0, 5)
    assert tl.overlap_ratio(spans, ["rollout", "trainer"], window) == pytest.approx((4 + 3) / 5)
    assert tl.idle_fraction(spans, ["rollout", "trainer"], window) == pytest.approx(0.0)
    # nested spans of one role are not counted twice
    nested = spans_of([("rollout", "process", 0, 4, 0), ("rollout", "generate", 1, 3, 0)])
    assert tl.overlap_ratio(nested, ["rollout"], tl.Window(0, 4)) == pytest.approx(1.0)


def test_analyse_reports_each_group_and_each_role_with_time_per_kind():
    spans = spans_of([*COLOCATED, ("reward", "process", 2, 2.5, 0)])
    groups = [tl.DeviceGroup("devices 0-3", (0, 1, 2, 3), ("rollout", "trainer"))]
    summary = tl.analyse(spans, groups, tl.step_window(spans, last_steps=1))
    doc = summary.to_json()
    assert doc["window"] == {"steps": [1], "start_s": 5, "end_s": 9.5, "wall_s": 4.5}
    assert [g["name"] for g in doc["groups"]] == ["devices 0-3", "reward (not in plan)"]  # a group of its own
    (group, reward) = doc["groups"]
    assert group["idle_fraction"] == pytest.approx(1 / 4.5) and group["busy_s"] == pytest.approx(3.5)
    assert reward["busy_s"] == 0 and reward["idle_fraction"] == 1.0  # its span is outside the window
    trainer = next(r for r in doc["roles"] if r["name"] == "trainer")
    assert trainer["group"] == "devices 0-3" and trainer["busy_s"] == pytest.approx(1.5)
    assert trainer["by_kind"] == pytest.approx({"barrier_wait": 2.0, "barrier": 1.5, "train": 1.0, "weight_sync": 0.5})
    assert json.loads(json.dumps(doc)) == doc


def one_step(t, step):
    """A 2 s step from time t: rollout item 0, then the trainer's barrier."""
    return [("rollout", "process", t, t + 1, step), ("trainer", "barrier", t + 1, t + 2, step)]


def test_a_resumed_trace_is_windowed_on_the_resumed_part_only():
    # steps 0-2 ran, the run died during step 3's rollout; it resumed at t=9
    # from the checkpoint after step 1 and redid steps 2 and 3.
    first = [*one_step(0, 0), *one_step(2, 1), *one_step(4, 2), ("rollout", "process", 6, 7, 3)]
    resumed = [*one_step(9, 2), *one_step(11, 3)]
    spans = spans_of(first + resumed)
    assert tl.restart_time(spans) == 9
    assert tl.step_window(spans, last_steps=2) == tl.Window(9, 13, (2, 3))
    assert tl.restart_time(spans_of(first)) is None
    assert tl.step_window(spans_of(first), last_steps=2) == tl.Window(4, 7, (2, 3))


def test_a_roles_device_wait_inside_its_process_span_is_not_busy_but_another_roles_work_is():
    from rlpipe.app.timeline import Span, Window, busy_intervals

    spans = [Span(role="rollout", name="process", start=0.0, end=10.0),
             Span(role="rollout", name="device_wait", start=2.0, end=6.0),
             Span(role="trainer", name="train", start=2.0, end=5.0)]
    assert busy_intervals(spans, ["rollout"]) == [(0.0, 2.0), (6.0, 10.0)]
    # the group is busy while the trainer works, even though the rollout waits
    assert busy_intervals(spans, ["rollout", "trainer"], window=Window(0.0, 10.0)) == [(0.0, 5.0), (6.0, 10.0)]
