"""The benchmark scripts' cheap parts, on tiny shapes: every record follows the
JSON-line schema (name, value, unit, ceiling, ratio), and the pipeline
analysis computes what its definitions say.  No timing is asserted."""

import io
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import agentic  # noqa: E402
import group_prefill  # noqa: E402
import kv_layout  # noqa: E402
import pipeline  # noqa: E402
import projections  # noqa: E402
import results  # noqa: E402
import rollout  # noqa: E402
import run_all  # noqa: E402
import shared_prompts  # noqa: E402
import startup  # noqa: E402
import train_step  # noqa: E402

from rlpipe.app import timeline as tl  # noqa: E402


def assert_schema(records):
    assert records
    for rec in records:
        results.check(rec)
        assert list(rec)[:5] == list(results.KEYS)
        assert json.loads(json.dumps(rec)) == rec  # plain JSON: no NaN, no numpy scalars
        if rec["ceiling"] is not None and rec["value"] is not None:
            assert rec["ratio"] == pytest.approx(rec["value"] / rec["ceiling"])


def test_record_fills_ratio_and_turns_non_finite_into_null():
    assert results.record("x", 2.0, "s", ceiling=4.0)["ratio"] == 0.5
    rec = results.record("x", float("nan"), "s", ceiling=4.0, extra={"a": float("inf")})
    assert rec["value"] is None and rec["ratio"] is None and rec["extra"] == {"a": None}
    assert results.record("x", 1.0, "s")["ratio"] is None


@pytest.mark.parametrize("bad", [{"name": "x", "value": 1, "unit": "s"},
                                 {"name": "x", "value": "1", "unit": "s", "ceiling": None, "ratio": None},
                                 {"name": "x", "value": 1, "unit": "s", "ceiling": None, "ratio": 0.5}])
def test_check_rejects_records_that_break_the_schema(bad):
    with pytest.raises(ValueError):
        results.check(bad)


def test_rollout_and_train_step_records(capsys):
    records = rollout.measure(batches=(2,), prompt_len=4, new_tokens=2, repeats=1, copy_mib=1)
    records += train_step.measure(batch=1, seq=8, repeats=1, matmul_size=64)
    assert_schema(records)
    names = {r["name"] for r in records}
    assert {"copy_bandwidth", "generate_throughput", "decode_throughput", "matmul_rate", "train_model_flops"} <= names
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == records  # the default sink prints each record as a JSON line


def test_agentic_records_compare_the_two_ways_on_the_same_episodes(capsys):
    records = agentic.measure(episodes=4, turns=3, prompt_tokens=4, turn_tokens=3, observation_tokens=2, repeats=1)
    assert_schema(records)
    by = {(r["name"], r.get("way")): r for r in records}
    least = 4 * (4 + 2 * 2)  # every prompt and observation once
    assert by[("agentic_prefill_tokens", "reuse")]["value"] == least == by[("agentic_prefill_tokens", "reuse")]["ceiling"]
    assert by[("agentic_prefill_tokens", "prefill")]["value"] > least
    speedup = by[("agentic_reuse_speedup", None)]
    assert speedup["value"] > 0 and speedup["prefill_token_ratio"] > 1


@pytest.fixture(scope="module")
def suite_records(tmp_path_factory):
    """run_all.py's memory and transfer parts (tiny preset, small probes), as
    printed with --json and as written to --out."""
    out = tmp_path_factory.mktemp("suite") / "results.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(run_all.PROBE_MIB, "cpu", {"copy": 4, "host": 4})
        mp.setattr(sys, "stdout", io.StringIO())
        status = run_all.main(["--only", "memory", "transfer", "--repeats", "1", "--json", "--out", str(out)])
        printed = sys.stdout.getvalue()
    assert status == 0
    return [json.loads(line) for line in printed.splitlines()], [json.loads(line) for line in out.read_text().splitlines()]


def _by_name(records):
    out = {}
    for r in records:
        out.setdefault(r["name"], []).append(r)
    return out


def test_run_all_memory_and_transfer_parts(suite_records):
    printed, written = suite_records
    assert printed == written
    assert_schema(printed)
    by_name = _by_name(printed)
    assert {"offload_bandwidth", "onload_bandwidth", "weight_sync_bandwidth", "host_to_device_bandwidth",
            "device_to_host_bandwidth", "copy_bandwidth", "memory_estimate"} <= set(by_name)
    assert all(r["suite"] in ("memory", "transfer") and r["platform"] == "cpu" for r in printed)
    # The CPU reports no memory statistics: the peak is unmeasured and says so.
    assert all(r["value"] is None and "GPU" in r["note"] for r in by_name["memory_peak"])
    # The inference roles hold exactly the parameters the plan estimates (per device, sharded).
    resident = {r["role"]: r for r in by_name["memory_resident"]}
    assert set(resident) == {"rollout", "reference", "trainer"}
    assert resident["rollout"]["value"] == resident["rollout"]["estimate_bytes"] > 0
    assert resident["reference"]["value"] == resident["reference"]["estimate_bytes"]


def test_trainer_state_per_device_matches_the_estimate(suite_records):
    trainer = next(r for r in suite_records[0] if r["name"] == "memory_resident" and r["role"] == "trainer")
    assert trainer["over_estimate"] == pytest.approx(1.0, rel=1e-3)


def _span(role, name, start, end, step=None):
    return tl.Span(role=role, name=name, start=start, end=end, step=step)


def test_pipeline_analysis_follows_its_definitions():
    # Steps 0-2; warm-up 1, so the window runs from the end of the trainer's
    # barrier of step 0 (t=2) to that of step 2 (t=6).  Rollout step 2 starts
    # early and waits 0.5 s for the devices the trainer holds.
    spans = [_span("rollout", "process", 0, 1, 0), _span("rollout", "generate", 0, 1, 0),
             _span("rollout", "process", 2, 3, 1), _span("rollout", "generate", 2, 3, 1),
             _span("rollout", "process", 3.5, 5, 2), _span("rollout", "generate", 3.5, 5, 2)]
    for k in range(3):
        b = 2 * k + 1
        spans += [_span("trainer", "barrier", b, b + 1, k), _span("trainer", "train", b + 0.2, b + 0.8, k),
                  _span("trainer", "weight_sync", b + 0.8, b + 0.9, k)]
    run = pipeline.TrainingRun(
        run_dir=Path("synthetic"), steps=3, sink="trainer", host_roles=set(),
        plan={"roles": [{"name": "rollout", "devices": [0]}, {"name": "trainer", "devices": [0]}]},
        metrics=[{"step": k, "time/step_s": 2.0} for k in range(3)], spans=sorted(spans, key=lambda s: s.start),
        device_wait={"rollout": [(3.5, 4.0)]}, device_hold={"trainer": [(3, 4), (5, 6)]})
    records = pipeline.pipeline_records(run, warmup=1, placement="colocated", mode="async")
    assert_schema(records)
    got = {(r["name"], r.get("role")): r for r in records}
    assert got["pipeline_step_time", None]["value"] == pytest.approx(2.0)
    assert got["pipeline_stage_busy", "rollout"]["value"] == pytest.approx(1.25)  # [2,3] + [3.5,5] over 2 steps
    assert got["pipeline_stage_busy", "rollout"]["device_wait_s"] == pytest.approx(0.25)
    assert got["pipeline_stage_busy", "trainer"]["value"] == pytest.approx(1.0)
    overlap = got["pipeline_overlap_ratio", None]
    assert overlap["value"] == pytest.approx(4.5 / 4) and overlap["excluding_device_wait"] == pytest.approx(1.0)
    slowest = got["pipeline_step_over_slowest_stage", None]
    assert slowest["slowest_stage"] == "rollout" and slowest["value"] == pytest.approx(4 / 2.5)
    assert slowest["over_busiest_device_group"] == pytest.approx(1.0)

    overhead = pipeline.framework_overhead(run, warmup=1)
    # Inside: generate less the wait ([2,3], [4,5]) and train ([3.2,3.8], [5.2,5.8]): 3.2 s of 4.
    assert overhead["fraction"] == pytest.approx(0.2)
    parts = overhead["parts_fraction"]
    assert parts["weight_sync"] == pytest.approx(0.05)
    assert parts["untraced_device_work"] == pytest.approx(0.15)  # the rest of the trainer's lock holds
    assert parts["stage_host_work"] == pytest.approx(0.0) and parts["between_stages"] == pytest.approx(0.0)


@pytest.mark.slow
def test_probed_training_run(tmp_path):
    # Two steps, every role on device 0 (the least compilation): the probe's
    # hooks must still find what they wrap, and the analysis a real trace.
    overrides = [*pipeline.SHAPE, "train.steps=2", "train.max_staleness=1", "train.prompts_per_item=2",
                 "roles.rollout.num_generations=2", "roles.rollout.max_new_tokens=2", "roles.trainer.micro_batch_size=4",
                 "roles.reference.micro_batch_size=4", "roles.trainer.mesh={shape: [1, 1], axes: [fsdp, tp]}"]
    run = pipeline.run_training([], overrides, run_dir=tmp_path / "run")
    assert run.sink == "trainer" and run.host_roles == {"reward"}
    assert {"rollout", "reference", "trainer"} <= set(run.device_hold)  # the probe saw every device role's work
    assert any(event == "backend_compile_duration" for event, *_ in run.compiles)
    records = pipeline.pipeline_records(run, warmup=1, placement="colocated", mode="async")
    assert_schema(records)
    assert {r["role"] for r in records if r["name"] == "pipeline_stage_busy"} == {"rollout", "reference", "trainer", "reward"}
    overhead = pipeline.framework_overhead(run, warmup=1)
    assert 0 <= overhead["fraction"] <= 1
    assert sum(overhead["parts_fraction"].values()) == pytest.approx(overhead["fraction"])


def test_startup_records_time_the_quick_commands_and_name_heavy_imports(capsys, tmp_path):
    records = startup.measure(commands=[("--version",)], repeats=1)
    assert_schema(records)
    by_name = {r["name"]: r for r in records}
    assert by_name["startup_time"]["value"] > 0 and by_name["startup_time"]["command"] == "rlpipe --version"
    assert by_name["startup_heavy_imports"]["value"] == 0 == len(by_name["startup_heavy_imports"]["modules"])
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == records
    # --rev measures a revision exported from git, not the work tree.
    assert (startup.package_root("HEAD", str(tmp_path)) / "rlpipe" / "__init__.py").is_file()


def test_lora_trainer_memory_records_follow_xla_and_the_stage():
    import lora as lora_benchmark

    records = lora_benchmark.trainer_memory(rank=2, rows=2, prompt_tokens=4, completion_tokens=2)
    assert_schema(records)
    by = {(r["name"], r["way"]): r["value"] for r in records}
    for way in ("full", "lora"):
        held = by[("trainer_params_bytes", way)] + by[("trainer_frozen_bytes", way)]
        # The program's arguments hold the parameters (trainable and frozen) and the accumulator,
        # and the donated accumulator is what its outputs reuse.
        assert by[("trainer_step_argument_bytes", way)] >= held + by[("trainer_accumulator_bytes", way)]
        assert by[("trainer_step_alias_bytes", way)] == by[("trainer_accumulator_bytes", way)]
    assert by[("trainer_frozen_bytes", "full")] == 0
    assert by[("trainer_frozen_bytes", "lora")] == by[("trainer_params_bytes", "full")]  # the base, float32 on the CPU
    assert by[("trainer_opt_state_bytes", "lora")] < by[("trainer_opt_state_bytes", "full")]


def test_projection_group_prefill_and_kv_layout_records():
    """Both forms of each comparison run and agree (group_prefill checks the tokens itself)."""
    recs = projections.measure("peer", pairs=1)
    assert_schema(recs)
    assert {r.get("form") for r in recs if r["name"] == "projection_grad_time"} == {"einsum", "dense"}
    recs = group_prefill.measure(preset="tiny", prompts=2, group=3, prompt_len=5, new_tokens=3, pairs=1)
    assert_schema(recs)
    assert [r["name"] for r in recs] == ["group_generate_time", "group_generate_time", "group_generate_speedup"]
    recs = shared_prompts.measure("peer", pairs=1)  # raises when the two forms disagree
    assert_schema(recs)
    assert {r.get("form") for r in recs if r["name"] == "shared_prompts_grad_time"} == {"repeated", "shared"}
    recs = kv_layout.measure("peer", pairs=1)  # asserts both layouts give the same scores
    assert_schema(recs)
    assert {(r["slots"], r.get("form")) for r in recs if r["name"] == "kv_scores_time"} == {
        (s, f) for s in (128, 320) for f in ("slots-major", "slots-minor")}
