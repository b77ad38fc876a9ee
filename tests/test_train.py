"""`rlpipe train` end to end on the CPU: the run directory and exit codes."""

import json

import pytest
import yaml
from click.testing import CliRunner

from rlpipe.cli.main import cli

#: End to end: every test here trains, resumes or runs processes (`-m "not slow"` skips them).
pytestmark = pytest.mark.slow

SMALL = ["--set", "train.prompts_per_item=2", "--set", "train.items_per_step=2",
         "--set", "roles.rollout.max_new_tokens=4", "--set", "roles.rollout.num_generations=2",
         "--set", "roles.trainer.micro_batch_size=4"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One short run shared by the tests that only read its directory."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    return run_dir, CliRunner().invoke(cli, ["train", "--steps", "2", "--run-dir", str(run_dir), "-q", *SMALL,
                                             "--set", "telemetry.tensorboard=true"])


def test_train_writes_config_metrics_and_trace(finished):
    run_dir, r = finished
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["steps"] == 2 and config["task"]["name"] == "reverse"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    for row in rows:
        assert {"reward/mean", "time/step_s", "loss", "kl", "grad_norm", "policy_version"} <= set(row)
    assert [row["policy_version"] for row in rows] == [1, 2]
    trace = json.loads((run_dir / "trace.json").read_text())
    tracks = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {"rollout", "reward", "reference", "trainer"} <= tracks
    barriers = [e for e in trace["traceEvents"] if e.get("name") == "barrier"]
    assert {e["args"]["step"] for e in barriers} == {0, 1}
    track = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    spans = {(track[e["tid"]], e["name"]) for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {("rollout", "generate"), ("reference", "logprobs"), ("trainer", "train"), ("trainer", "weight_sync")} <= spans
    generate = [e for e in trace["traceEvents"] if e.get("name") == "generate"]
    assert all({"step", "policy_version"} <= set(e["args"]) for e in generate)


def test_saved_config_reproduces_the_run_config(finished):
    run_dir, _ = finished
    again = CliRunner().invoke(cli, ["config", "show", "-c", str(run_dir / "config.yaml")])
    assert yaml.safe_load(again.stdout) == {**yaml.safe_load((run_dir / "config.yaml").read_text())}


def test_a_failing_stage_exits_1_with_one_error_line_and_keeps_the_trace(tmp_path, monkeypatch):
    from rlpipe.roles.trainer_stage import TrainerStage

    def broken(self, *, context):
        raise ValueError("the update went wrong")

    monkeypatch.setattr(TrainerStage, "on_barrier", broken)  # the batch arithmetic is a config error now
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--steps", "2", "--run-dir", str(run_dir), "-q", *SMALL])
    assert r.exit_code == 1
    assert r.stderr.splitlines()[-1] == "error: stage 'trainer' failed at step 0: ValueError: the update went wrong"
    assert "Traceback" not in r.stderr
    assert (run_dir / "trace.json").exists()


def test_batch_arithmetic_is_a_config_error_before_anything_runs(tmp_path):
    r = CliRunner().invoke(cli, ["train", "--steps", "2", "--run-dir", str(tmp_path / "run"), "-q", *SMALL,
                                 "--set", "roles.trainer.mini_batch_size=3"])
    assert r.exit_code == 2
    assert r.stderr.splitlines()[-2:] == [
        ("error: roles.trainer.mini_batch_size: 3 does not divide the global batch of 8 rows (train.items_per_step 2 × "
         "train.prompts_per_item 2 × roles.rollout.num_generations 2); the nearest that divide it: 2 or 4"),
        ("error: roles.trainer.micro_batch_size: 4 does not divide the mini-batch of 3 rows "
         "(roles.trainer.mini_batch_size); the nearest that divide it: 3"),
    ]
    assert not (tmp_path / "run").exists()


def test_config_errors_exit_2_before_anything_runs(tmp_path):
    r = CliRunner().invoke(cli, ["train", "--run-dir", str(tmp_path / "run"), "--set", "task.name=revers"])
    assert r.exit_code == 2
    assert "error: task.name: unknown task 'revers' (did you mean 'reverse'?)" in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("seed", "max_staleness"), [("colocated_offload", 0), ("disaggregated", 1)])
def test_the_seed_placements_train_end_to_end_on_8_devices(tmp_path, seed, max_staleness):
    from helpers import EXAMPLES

    run_dir = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--steps", "3", "--run-dir", str(run_dir), "-q", "-c", str(EXAMPLES / f"{seed}.yaml"), *SMALL])
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["policy_version"] for row in rows] == [1, 2, 3]
    assert max(row["staleness_max"] for row in rows) <= max_staleness
    trace = json.loads((run_dir / "trace.json").read_text())
    names = {e["name"] for e in trace["traceEvents"]}
    assert ("onload" in names) == (seed == "colocated_offload")


def test_train_writes_tensorboard_scalars_and_a_final_checkpoint(finished):
    pytest.importorskip("tensorboardX")
    from tensorboardX.proto import event_pb2

    run_dir, r = finished
    assert r.exit_code == 0, r.stderr
    [events] = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    import struct

    data, tags, pos = events.read_bytes(), set(), 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        tags |= {v.tag for v in event.summary.value}
        pos += 12 + n + 4
    assert {"reward/mean", "loss"} <= tags
    assert (run_dir / "checkpoints" / "1").is_dir()  # after the last step


def test_eval_scores_the_latest_checkpoint_on_the_held_out_split(finished):
    run_dir, _ = finished
    r = CliRunner().invoke(cli, ["eval", str(run_dir), "-n", "4", "-k", "2", "--json"])
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["checkpoint_step"] == 1 and result["split"] == "eval"
    assert 0.0 <= result["greedy/accuracy"] <= 1.0 and 0.0 <= result["sampled/pass@k"] <= 1.0
    table = CliRunner().invoke(cli, ["eval", str(run_dir), "-n", "4", "-k", "0", "--initial"])
    assert table.exit_code == 0 and "initial policy" in table.stdout and "greedy/accuracy" in table.stdout


def test_eval_of_a_missing_checkpoint_lists_the_ones_there(finished, tmp_path):
    run_dir, _ = finished
    r = CliRunner().invoke(cli, ["eval", str(run_dir), "--step", "7"])
    assert r.exit_code == 2 and "no checkpoint of step 7 (there are: 1)" in r.stderr
    r = CliRunner().invoke(cli, ["eval", str(tmp_path)])
    assert r.exit_code == 2 and "not a run directory" in r.stderr
