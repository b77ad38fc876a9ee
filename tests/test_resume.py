"""Checkpoints and exact resume, end to end with the tiny model.

A run interrupted after some step — by reaching ``--steps``, by SIGTERM or
SIGINT, or by ``kill -9`` once a checkpoint is on disk — and then resumed
must end with the same metrics and parameters as an uninterrupted run:
bit-identical on-policy, and (with the executor's fixed lag) identical for
asynchronous runs too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rlpipe.app.defaults import DEFAULT_CONFIG
from rlpipe.app.driver import train
from rlpipe.cli.main import cli
from rlpipe.runtime.run_config import load_config

pytestmark = pytest.mark.slow

SMALL = ["train.prompts_per_item=2", "train.items_per_step=2", "roles.rollout.max_new_tokens=2",
         "roles.rollout.num_generations=4", "roles.trainer.micro_batch_size=8", "roles.trainer.num_iterations=2",
         "checkpoint.every=1", "checkpoint.keep=10"]
STEPS = 4
EXACT = ("step", "loss", "reward/mean", "kl", "grad_norm", "policy_version", "staleness_mean", "ratio/mean")
ASYNC = ["train.max_staleness=1"]


def cfg(registry, steps, *extra):
    return load_config(registry, defaults=DEFAULT_CONFIG, overrides=[*SMALL, f"train.steps={steps}", *extra])


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in EXACT if k in r} for r in rows(run_dir)]


def trainer_arrays(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    import jax
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "stage.trainer")
    # A nested tree (checkpoint format 2): compared leaf by leaf, keyed by path.
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def assert_same_params(a: Path, b: Path, step: int) -> None:
    x, y = trainer_arrays(a, step), trainer_arrays(b, step)
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference runs, on-policy and asynchronous."""
    from rlpipe.core.plugins import load_registry

    registry = load_registry()
    base = tmp_path_factory.mktemp("full")
    out = {}
    for name, extra in (("on-policy", []), ("async", ASYNC)):
        train(cfg(registry, STEPS, *extra), registry, run_dir=base / name)
        out[name] = base / name
    return out


@pytest.mark.parametrize("mode", ["on-policy", "async"])
def test_run_extended_past_its_steps_matches_the_uninterrupted_run(tmp_path, registry, uninterrupted, mode):
    extra = ASYNC if mode == "async" else []
    run_dir = tmp_path / "run"
    train(cfg(registry, 2, *extra), registry, run_dir=run_dir)
    summary = train(cfg(registry, STEPS, *extra), registry, run_dir=run_dir)
    assert summary.steps == STEPS
    assert comparable(run_dir) == comparable(uninterrupted[mode])
    assert_same_params(run_dir, uninterrupted[mode], STEPS - 1)


def _start(run_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sets = [x for s in SMALL for x in ("--set", s)]
    return subprocess.Popen([sys.executable, "-m", "rlpipe", "train", "-q", "--run-dir", str(run_dir),
                             "--steps", str(STEPS), *sets, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (status {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.1)


def _has_rows(run_dir: Path, n: int):
    path = run_dir / "metrics.jsonl"
    return lambda: path.exists() and len(path.read_text().splitlines()) >= n


# SIGINT takes the same path as SIGTERM (one handler); only its status differs,
# which test_sigint_and_sigterm_exit_with_their_documented_status checks cheaply.
@pytest.mark.parametrize("sig, status, mode", [(signal.SIGTERM, 143, "async")])
def test_signal_writes_a_checkpoint_exits_with_its_status_and_resumes_exactly(tmp_path, registry, uninterrupted,
                                                                              sig, status, mode):
    extra = ASYNC if mode == "async" else []
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "--set", "checkpoint.every=0", *[x for s in extra for x in ("--set", s)])
    try:
        _wait_for(_has_rows(run_dir, 1), proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == status, err[-2000:]
    assert "writing a checkpoint" in err and "resume with: rlpipe train --run-dir" in err
    checkpoints = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpoints, "no checkpoint written on the signal"
    assert len(rows(run_dir)) == checkpoints[-1] + 1 < STEPS
    summary = train(cfg(registry, STEPS, *extra), registry, run_dir=run_dir)
    assert summary.steps == STEPS
    assert comparable(run_dir) == comparable(uninterrupted[mode])
    assert_same_params(run_dir, uninterrupted[mode], STEPS - 1)


def test_kill_9_after_a_checkpoint_loses_only_the_steps_after_it(tmp_path, registry, uninterrupted):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "--set", "train.max_staleness=1")
    try:
        _wait_for(lambda: (run_dir / "checkpoints" / "1" / "commit_success.txt").exists()
                  or (run_dir / "checkpoints" / "2").exists(), proc)
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait(timeout=30)
    finally:
        proc.kill()
    summary = train(cfg(registry, STEPS, *ASYNC), registry, run_dir=run_dir)
    assert summary.steps == STEPS
    assert comparable(run_dir) == comparable(uninterrupted["async"])
    assert_same_params(run_dir, uninterrupted["async"], STEPS - 1)


# -- the command line around resume -----------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(cli, ["train", "-q", *[x for s in SMALL for x in ("--set", s)], *args])


def test_no_resume_refuses_an_existing_run_and_force_starts_over(uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted["on-policy"], run_dir)
    r = invoke("--run-dir", str(run_dir), "--no-resume", "--steps", "1")
    assert r.exit_code == 2
    assert "exists and is not empty" in r.stderr and "--force" in r.stderr
    r = invoke("--run-dir", str(run_dir), "--no-resume", "--force", "--steps", "1")
    assert r.exit_code == 0, r.stderr
    assert [row["step"] for row in rows(run_dir)] == [0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["0"]


def test_force_refuses_to_delete_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    r = invoke("--run-dir", str(tmp_path), "--no-resume", "--force", "--steps", "1")
    assert r.exit_code == 2 and "does not look like an rlpipe run directory" in r.stderr
    assert (tmp_path / "precious.txt").exists()


def test_a_completed_run_says_how_to_continue(uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted["on-policy"], run_dir)
    r = invoke("--run-dir", str(run_dir), "--steps", str(STEPS))
    assert r.exit_code == 0, r.stderr
    assert "the run already completed step 3 (4 of 4 steps); raise --steps to continue" in r.stderr
    assert len(rows(run_dir)) == STEPS


def test_incompatible_config_change_names_the_key_and_changes_nothing(uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted["on-policy"], run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    r = invoke("--run-dir", str(run_dir), "--steps", "6", "--set", "roles.rollout.num_generations=2")
    assert r.exit_code == 2
    [line] = r.stderr.strip().splitlines()[-1:]
    assert "config changed incompatibly" in line and "roles.rollout.num_generations: 4 in the run, 2 now" in line
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_corrupt_checkpoint_metadata_names_the_file(uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted["on-policy"], run_dir)
    meta = run_dir / "checkpoints" / str(STEPS - 1) / "meta" / "metadata"
    meta.write_text("{not json")
    r = invoke("--run-dir", str(run_dir), "--steps", "6")
    assert r.exit_code == 2
    assert str(run_dir / "checkpoints" / str(STEPS - 1)) in r.stderr and "Traceback" not in r.stderr


def test_a_checkpoint_with_a_different_model_shape_names_the_array(uninterrupted, tmp_path, registry):
    from rlpipe.runtime.checkpoint import CheckpointError, RunCheckpointer

    ck = RunCheckpointer(uninterrupted["on-policy"] / "checkpoints")
    good = {"params": {"w": np.zeros((3, 4), np.float32)}}
    with pytest.raises(CheckpointError) as info:
        ck.restore(STEPS - 1, templates={"trainer": good})
    assert "stage.trainer" in str(info.value)


def test_sigint_and_sigterm_exit_with_their_documented_status():
    from rlpipe.cli.signals import StopState

    state = StopState()
    assert state.exit_code == 1 and state.name == ""
    state.signal = signal.SIGINT
    assert (state.name, state.exit_code) == ("SIGINT", 130)
    state.signal = signal.SIGTERM
    assert (state.name, state.exit_code) == ("SIGTERM", 143)
