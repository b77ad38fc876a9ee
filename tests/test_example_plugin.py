"""The third-party example package examples/rlpipe-judge, found through a real
entry point (a fake installed distribution): listed, selectable, placed, run."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import ROOT, config

from rlpipe import Batch, Executor
from rlpipe.cli.main import cli
from rlpipe.core.plugins import load_registry
from rlpipe.runtime.planning import build_stages, plan_run
from rlpipe.testing import RecordingStage, fake_devices, fake_distribution


@pytest.fixture
def judge_installed(tmp_path, monkeypatch):
    fake_distribution(tmp_path, name="rlpipe-judge", version="0.1.0", entry_points={"judge": "rlpipe_judge"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "rlpipe-judge" / "src"))


def test_role_and_policy_are_listed_with_their_distribution(judge_installed):
    roles = {e["name"]: e for e in json.loads(CliRunner().invoke(cli, ["roles", "list", "--json"]).stdout)}
    assert roles["judge"]["distribution"] == "rlpipe-judge" and roles["judge"]["version"] == "0.1.0"
    assert roles["judge"]["status"] == "active" and roles["judge"]["produces"] == ["judge_scores"]
    policies = {e["name"]: e for e in json.loads(CliRunner().invoke(cli, ["placements", "list", "--json"]).stdout)}
    assert policies["spread"]["distribution"] == "rlpipe-judge"


def test_the_judge_joins_the_graph_and_is_placed(judge_installed):
    r = CliRunner().invoke(cli, ["plan", "--json", "--set", "roles.judge={colocate_with: rollout}", "--set", "roles.judge.weight=2"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    judge = next(x for x in doc["roles"] if x["name"] == "judge")
    assert judge["devices"] == list(range(8))
    assert {"from": "rollout", "to": "judge", "blocking": False} in doc["boundaries"]
    assert {"from": "judge", "to": "trainer", "blocking": False} in doc["boundaries"]


def test_the_policy_is_selectable_by_config(judge_installed):
    r = CliRunner().invoke(cli, ["plan", "--json", "--set", "roles.judge={}", "--set", "placement.policy=spread"])
    doc = json.loads(r.stdout)
    assert doc["policy"] == "spread" and doc["mode"] == "disaggregated"
    # five roles on eight devices: one each, the trainer (the sink) takes the remainder
    assert [(x["name"], x["devices"]) for x in doc["roles"]] == [
        ("rollout", [0]), ("reward", [1]), ("reference", [2]), ("trainer", [3, 4, 5, 6]), ("judge", [7])]


def test_the_judges_config_section_is_typed_by_the_plugin(judge_installed):
    r = CliRunner().invoke(cli, ["config", "validate", "--set", "roles.judge={weight: 1, wieght: 2}"])
    assert r.exit_code == 2
    assert r.stderr == "error: roles.judge.wieght: unknown key (did you mean 'weight'?) (valid keys: mesh, colocate_with, offload, weight, min_tokens)\n"
    r = CliRunner().invoke(cli, ["config", "validate", "--set", "roles.judge.weight=-1"])
    assert r.exit_code == 2 and r.stderr == "error: roles.judge.weight: must be at least 0, got -1.0\n"


def test_the_judge_stage_runs_in_the_pipeline_and_its_scores_reach_the_trainer(judge_installed):
    reg = load_registry(warn=lambda m: None)
    planned = plan_run(config(reg, {"roles": {"judge": {"weight": 2.0}}}), reg, fake_devices(8))
    judge = planned.roles["judge"].factory(planned.config.roles["judge"], planned.plan.role("judge"), context=None)
    seen = []

    class Trainer(RecordingStage):
        def process(self, batch, *, context):
            seen.append(np.asarray(batch["judge_scores"]))
            return super().process(batch, context=context)

    tokens = np.array([[[5, 5, 5, 5], [1, 2, 3, 4]]])  # [prompts, generations, tokens]
    rollout = RecordingStage("rollout", {
        "completion_tokens": lambda b, c: tokens, "completion_mask": lambda b, c: np.array([[[1, 1, 1, 1], [1, 1, 1, 0]]]),
        "rollout_logprobs": lambda b, c: np.zeros((1, 2, 4)), "policy_version": lambda b, c: np.asarray(c.policy_version)})
    stages = {"rollout": rollout, "reward": RecordingStage("reward", {"rewards": lambda b, c: np.zeros((1, 2))}),
              "reference": RecordingStage("reference", {"ref_logprobs": lambda b, c: np.zeros((1, 2, 4))}),
              "judge": judge, "trainer": Trainer("trainer")}
    Executor(planned.graph, stages, planned.plan).run([[Batch(prompt_tokens=np.zeros((1, 2)), prompt_mask=np.ones((1, 2)))]], steps=1)
    # One score per completion, shaped like the rewards: a reward term can use it.
    np.testing.assert_allclose(seen[0], [[2.0 * 1 / 4, 2.0 * 3 / 3]])


def test_the_judges_scores_are_a_reward_term(judge_installed):
    r = CliRunner().invoke(cli, ["plan", "--json", "--set", "roles.judge={}", "--set", "roles.reward.terms={judge_scores: 0.5}"])
    assert r.exit_code == 0, r.stderr
    boundaries = {(b["from"], b["to"]) for b in json.loads(r.stdout)["boundaries"]}
    assert ("judge", "reward") in boundaries and ("judge", "trainer") not in boundaries


def test_build_stages_builds_the_third_party_judge_next_to_the_builtins(judge_installed):
    from rlpipe import BuildContext

    reg = load_registry(warn=lambda m: None)
    planned = plan_run(config(reg, {"roles": {"judge": {}}}), reg, fake_devices(8))
    stages = build_stages(planned, context=BuildContext(run_config=planned.config, registry=reg))
    assert set(stages) == {"rollout", "reward", "reference", "judge", "trainer"}
    assert type(stages["judge"]).__name__ == "JudgeStage"
