"""``roles.reward.terms``: other roles' fields added to the reward, logged as ``reward/<field>``."""

import json
import types

import numpy as np
import pytest
from click.testing import CliRunner

from rlpipe import (
    Batch,
    BuildContext,
    ConfigError,
    RoleConfig,
    RoleSpec,
    StageContext,
    hookimpl,
)
from rlpipe.cli.main import cli
from rlpipe.core.plugins import load_registry
from rlpipe.models.tokenizer import load_tokenizer
from rlpipe.plugins.rewards import RewardTerm
from rlpipe.roles.reward import RewardConfig, RewardStage
from rlpipe.runtime.planning import plan_run
from rlpipe.testing import fake_devices, register_plugin

SMALL = ["--set", "train.prompts_per_item=2", "--set", "train.items_per_step=2",
         "--set", "roles.rollout.max_new_tokens=4", "--set", "roles.rollout.num_generations=2",
         "--set", "roles.trainer.micro_batch_size=4"]


class LengthJudge:
    """Scores each completion by its number of valid tokens: ``judge_scores [P, G]``."""

    def process(self, batch, *, context):
        return batch.add(judge_scores=np.asarray(batch["completion_mask"]).sum(-1).astype(np.float32))


JUDGE = types.SimpleNamespace(rlpipe_roles=hookimpl(lambda: [RoleSpec(
    name="judge", description="completion length", config_type=RoleConfig,
    consumes={"completion_tokens", "completion_mask"}, produces={"judge_scores"}, uses_devices=False,
    factory=lambda config, placement, *, context: LengthJudge())]))


@pytest.fixture(scope="module")
def judge_registry():
    with register_plugin(JUDGE, name="length-judge"):
        return load_registry(warn=lambda m: None)


def reward_stage(registry, **cfg):
    from helpers import config

    return RewardStage(RewardConfig(**cfg), None, context=BuildContext(run_config=config(registry), registry=registry))


def hand_made_batch(**extra):
    tok = load_tokenizer("char")
    completions, answers = [["123", "120"], ["9", "8"]], ["123", "9"]
    toks = np.zeros((2, 2, 3), np.int32)
    mask = np.zeros((2, 2, 3), np.int32)
    for i, row in enumerate(completions):
        for j, text in enumerate(row):
            ids = tok.encode(text)
            toks[i, j, :len(ids)], mask[i, j, :len(ids)] = ids, 1
    prompt = np.array([tok.encode("q:")] * 2)
    return Batch(prompt_tokens=prompt, prompt_mask=np.ones_like(prompt), completion_tokens=toks, completion_mask=mask,
                 example=np.array([{"answer": a} for a in answers], dtype=object), **extra)


def test_the_reward_is_the_task_reward_plus_the_weighted_terms(registry):
    functions = (RewardTerm(name="exact-match"),)
    judge = np.array([[0.5, 1.0], [2.0, -1.0]], np.float32)
    length = np.array([[3, 3], [1, 1]], np.float32)
    plain = reward_stage(registry, functions=functions).process(hand_made_batch(), context=StageContext(role="reward", step=0, index=0))
    s = reward_stage(registry, functions=functions, terms={"judge_scores": 0.5, "length": -2.0})
    out = s.process(hand_made_batch(judge_scores=judge, length=length), context=StageContext(role="reward", step=0, index=0))
    np.testing.assert_array_equal(plain["rewards"], [[1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(out["rewards"], plain["rewards"] + 0.5 * judge - 2.0 * length, rtol=1e-6)
    assert out["rewards"].dtype == np.float32
    # The step's metrics: each term's raw mean over every micro-batch of the step.
    s.process(hand_made_batch(judge_scores=judge + 1, length=length), context=StageContext(role="reward", step=0, index=1))
    s.on_barrier(context=StageContext(role="reward", step=0))
    assert s.last_metrics == pytest.approx({"judge_scores": float(judge.mean()) + 0.5, "length": 2.0})
    s.on_barrier(context=StageContext(role="reward", step=1))  # nothing scored since: no stale values
    assert all(np.isnan(v) for v in s.last_metrics.values())


def test_a_term_of_the_wrong_shape_names_the_field_and_both_shapes(registry):
    s = reward_stage(registry, terms={"judge_scores": 1.0})
    with pytest.raises(ValueError, match=r"roles.reward.terms.judge_scores: field 'judge_scores' has shape \[2\], "
                                         r"but .* \[prompts, num_generations\] = \[2, 2\]"):
        s.process(hand_made_batch(judge_scores=np.ones(2, np.float32)), context=StageContext(role="reward", step=0, index=0))


def test_the_graph_runs_the_reward_after_the_producers_of_its_terms(judge_registry):
    from helpers import config

    cfg = config(judge_registry, {"roles": {"judge": {}, "reward": {"terms": {"judge_scores": 0.5}}}})
    graph = plan_run(cfg, judge_registry, fake_devices(8)).graph
    assert graph.order.index("judge") < graph.order.index("reward")
    judge_edges = [e for e in graph.edges if e.upstream == "judge"]
    assert [(e.downstream, e.implicit) for e in judge_edges] == [("reward", False)]
    # Without the term nothing consumes judge_scores: it flows into the trainer, beside the reward.
    plain = plan_run(config(judge_registry, {"roles": {"judge": {}}}), judge_registry, fake_devices(8)).graph
    assert ("judge", "trainer") in plain.edge_pairs() and ("judge", "reward") not in plain.edge_pairs()


UNKNOWN = (r"^roles.reward.terms.judge_score: no role produces field 'judge_score' \(did you mean 'judge_scores'\?\); "
           r"produced fields: .*completion_tokens.*judge_scores.*rollout_logprobs")


def test_an_unknown_term_field_is_one_config_error_at_its_path(judge_registry):
    from helpers import config

    cfg = config(judge_registry, {"roles": {"judge": {}, "reward": {"terms": {"judge_score": 1.0}}}})
    with pytest.raises(ConfigError) as info:
        plan_run(cfg, judge_registry, fake_devices(8))
    assert len(info.value.lines()) == 1
    assert info.match(UNKNOWN)


def test_config_validate_and_plan_report_an_unknown_term_field():
    args = ["--set", "roles.judge={}", "--set", "roles.reward.terms={judge_score: 1.0}"]
    with register_plugin(JUDGE, name="length-judge"):
        for command in (["config", "validate"], ["plan"]):
            r = CliRunner().invoke(cli, [*command, *args])
            assert r.exit_code == 2, (command, r.output)
            errors = [line for line in r.stderr.splitlines() if line.strip()]
            assert len(errors) == 1 and "roles.reward.terms.judge_score: no role produces field 'judge_score'" in errors[0], errors
        ok = CliRunner().invoke(cli, ["config", "validate", "--set", "roles.judge={}", "--set", "roles.reward.terms={judge_scores: 1.0}"])
        assert ok.exit_code == 0, ok.output


def test_a_bad_weight_is_a_config_error(judge_registry):
    from helpers import config

    with pytest.raises(ConfigError, match=r"roles.reward.terms.*expected a number"):
        config(judge_registry, {"roles": {"judge": {}, "reward": {"terms": {"judge_scores": "high"}}}})


@pytest.mark.slow
def test_a_judge_term_shifts_the_logged_reward_by_its_weighted_mean(tmp_path):
    def run(name, *extra):
        run_dir = tmp_path / name
        r = CliRunner().invoke(cli, ["train", "--steps", "1", "--run-dir", str(run_dir), "-q", *SMALL,
                                     "--set", "roles.judge={}", *extra])
        assert r.exit_code == 0, r.output
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][0]

    with register_plugin(JUDGE, name="length-judge"):
        plain = run("plain")
        weighted = run("terms", "--set", "roles.reward.terms={judge_scores: 0.5}")
    assert "reward/judge_scores" not in plain
    score = weighted["reward/judge_scores"]
    assert 1.0 <= score <= 4.0  # a mean completion length, max_new_tokens=4
    assert weighted["reward/mean"] == pytest.approx(plain["reward/mean"] + 0.5 * score, abs=1e-5)
