"""Reward functions and the host-side reward stage."""

import types

import numpy as np
import pytest

from rlpipe import Batch, BuildContext, StageContext, hookimpl
from rlpipe.core.plugins import load_registry
from rlpipe.core.specs import RewardFunctionSpec
from rlpipe.models.tokenizer import load_tokenizer
from rlpipe.plugins.rewards import (
    RewardTerm,
    exact_match,
    final_number,
    math_answer,
    partial_match,
)
from rlpipe.roles.reward import RewardConfig, RewardFunctionError, RewardStage
from rlpipe.testing import register_plugin


def test_exact_and_partial_match():
    ex = {"answer": "54321"}
    assert exact_match("", " 54321 ", ex) == 1.0 and exact_match("", "5432", ex) == 0.0
    assert partial_match("", "54321", ex) == 1.0
    assert partial_match("", "54300", ex) == pytest.approx(3 / 5)
    assert partial_match("", "5432199", ex) == pytest.approx(3 / 5)  # two extra characters cost two hits
    assert partial_match("", "", ex) == 0.0 and partial_match("", "xxxxxxxxxxx", ex) == 0.0


@pytest.mark.parametrize(("completion", "answer", "score"), [
    ("so the answer is 42.", "#### 42", 1.0), ("1,234 apples", "1234", 1.0), ("3.50", "3.5", 1.0),
    ("-7", "#### -7", 1.0), ("41 or 42? 41", "42", 0.0), ("no idea", "42", 0.0),
])
def test_math_answer_compares_final_numbers(completion, answer, score):
    assert math_answer("", completion, {"answer": answer}) == score


def test_final_number():
    assert final_number("a 1 b 2,000.50") == "2000.5" and final_number("none") is None


def batch_of(completions, answers, tok):
    n = max(len(c) for row in completions for c in row)
    p, g = len(completions), len(completions[0])
    toks = np.zeros((p, g, n), np.int32)
    mask = np.zeros((p, g, n), np.int32)
    for i, row in enumerate(completions):
        for j, text in enumerate(row):
            ids = tok.encode(text)
            toks[i, j, : len(ids)] = ids
            mask[i, j, : len(ids)] = 1
    prompt = np.array([tok.encode("q:")] * p)
    return Batch(prompt_tokens=prompt, prompt_mask=np.ones_like(prompt), completion_tokens=toks, completion_mask=mask,
                 example=np.array([{"answer": a} for a in answers], dtype=object))


def stage(registry, **cfg):
    from helpers import config

    run = config(registry)
    return RewardStage(RewardConfig(**cfg), None, context=BuildContext(run_config=run, registry=registry))


def test_reward_stage_sums_weighted_functions(registry):
    tok = load_tokenizer("char")
    s = stage(registry, functions=(RewardTerm(name="exact-match", weight=2.0), RewardTerm(name="partial-match", weight=0.5)))
    out = s.process(batch_of([["123", "120"], ["9", "8"]], ["123", "9"], tok), context=StageContext(role="reward", step=0, index=0))
    np.testing.assert_allclose(out["rewards"], [[2.5, 0.5 * 2 / 3], [2.5, 0.0]], rtol=1e-6)
    assert out["rewards"].dtype == np.float32 and s.scored == 4


def test_a_raising_reward_function_names_itself_and_the_sample():
    def boom(prompt, completion, example):
        if completion == "bad":
            raise ZeroDivisionError("nope")
        return 1.0

    plugin = types.SimpleNamespace(rlpipe_reward_functions=hookimpl(lambda: [RewardFunctionSpec(name="boom", description="d", fn=boom)]))
    with register_plugin(plugin, name="boom"):
        reg = load_registry(warn=lambda m: None)
    tok = load_tokenizer("char")
    b = batch_of([["ok", "bad"]], ["x"], tok)
    with pytest.raises(RewardFunctionError, match=r"reward function 'boom' raised on step 3, micro-batch 1, prompt 0, generation 1 \('bad'\): ZeroDivisionError: nope"):
        stage(reg, functions=(RewardTerm(name="boom"),)).process(b, context=StageContext(role="reward", step=3, index=1))
    lenient = stage(reg, functions=(RewardTerm(name="boom"),), on_error="zero")
    out = lenient.process(b, context=StageContext(role="reward", step=0, index=0))
    np.testing.assert_array_equal(out["rewards"], [[1.0, 0.0]])
    assert lenient.failures == 1


def test_an_unknown_reward_function_is_a_config_error(registry):
    from rlpipe import ConfigError

    with pytest.raises(ConfigError, match=r"roles.reward.functions\[0\].name: unknown reward function 'exact-mach' \(did you mean 'exact-match'\?\)"):
        stage(registry, functions=(RewardTerm(name="exact-mach"),))


def test_config_validate_names_an_unknown_reward_function_before_anything_runs():
    from click.testing import CliRunner

    from rlpipe.cli.main import cli

    r = CliRunner().invoke(cli, ["config", "validate", "--set", "roles.reward.functions=[{name: exact-mach}]"])
    assert r.exit_code == 2
    assert "roles.reward.functions[0].name: unknown reward function 'exact-mach' (did you mean 'exact-match'?)" in r.stderr
    assert CliRunner().invoke(cli, ["config", "validate", "--set", "roles.reward.functions=[{name: exact-match}]"]).exit_code == 0
