"""rlpipe.app.evaluation: greedy accuracy, sampled pass@k and mean reward on a task's
held-out split, with the tiny model (real generation) and with an oracle
rollout engine (known answers, so the aggregation is checked exactly)."""

from __future__ import annotations

import itertools
import json
import types
from fractions import Fraction
from math import comb

import jax
import numpy as np
import pytest
from helpers import config
from jax.sharding import AxisType, Mesh

from rlpipe.app.evaluation import evaluate, pass_at_k
from rlpipe.core.hookspecs import hookimpl
from rlpipe.core.plugins import load_registry
from rlpipe.core.specs import RolloutEngineSpec
from rlpipe.models.generation import Generation
from rlpipe.models.tokenizer import CharTokenizer
from rlpipe.plugins.tasks import DigitTask, DigitTaskConfig
from rlpipe.testing import register_plugin

# Three-digit reversal: 1000 prompts, about 100 held out; completions of 4 tokens.
SMALL = {"task": {"name": "reverse", "options": {"min_digits": 3, "max_digits": 3}},
         "roles": {"rollout": {"max_new_tokens": 4}}}


# -- the pass@k estimator ------------------------------------------------------------------


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (4, 0, 2, 0.0),
    (4, 1, 2, 1 - 3 / 6),      # C(3,2)/C(4,2): both picks miss the one correct sample
    (4, 2, 2, 1 - 1 / 6),
    (4, 3, 2, 1.0),            # fewer than k wrong samples: some pick is correct
    (5, 2, 1, 2 / 5),          # pass@1 is the share of correct samples
    (3, 1, 3, 1.0),            # n == k: any correct sample counts
    (3, 0, 3, 0.0),
    (10, 3, 4, 1 - 35 / 210),  # C(7,4) / C(10,4)
])
def test_pass_at_k_matches_hand_computation(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("n", "k"), [(5, 1), (5, 3), (6, 2), (7, 7)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(n, k):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        share = Fraction(sum(any(s) for s in subsets), len(subsets))
        assert len(subsets) == comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(float(share), abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# -- with the tiny model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """The tiny random policy evaluated once (greedy + 3 samples per example)."""
    reg = load_registry(warn=lambda m: None)
    cfg = config(reg, SMALL)
    return reg, cfg, evaluate(cfg, reg, num_examples=6, k=2, num_samples=3, batch_size=8, details=True)


def test_evaluate_on_reverse_returns_sane_numbers(tiny):
    _, _, r = tiny
    json.dumps(r, allow_nan=False)  # plain data, no NaN
    assert (r["task"], r["split"], r["examples"], r["k"], r["samples_per_example"]) == ("reverse", "eval", 6, 2, 3)
    assert r["correct_reward"] == "partial-match" and r["prompts_rejected"] == r["prompts_truncated"] == 0
    for key in ("greedy/accuracy", "sampled/accuracy", "sampled/pass@k"):
        assert 0.0 <= r[key] <= 1.0
    assert r["sampled/accuracy"] <= r["sampled/pass@k"]
    assert r["greedy/correct"] == round(r["greedy/accuracy"] * 6)
    for mode in ("greedy", "sampled"):
        # the total reward is the (weight 1) sum of the task's two reward functions
        parts = r[f"{mode}/reward/partial-match"] + r[f"{mode}/reward/digits"]
        assert r[f"{mode}/reward_mean"] == pytest.approx(parts)
        assert 0 < r[f"{mode}/completion_tokens_mean"] <= 4
    # the examples are distinct and all from the held-out split
    prompts = [s["prompt"] for s in r["samples"]]
    held_out = DigitTask("reverse", DigitTaskConfig(min_digits=3, max_digits=3))._held_out
    assert len(set(prompts)) == 6 and all(held_out(p) for p in prompts)
    assert all(s["answer"] == s["prompt"][:-1][::-1] for s in r["samples"])


def test_greedy_is_deterministic_and_model_state_installs_the_parameters(tiny):
    from flax import nnx

    from rlpipe.models.loading import load_model

    reg, cfg, first = tiny
    # Another sampling seed, and the initial policy's parameters passed in as the
    # trainer holds them (on one device; evaluate lays them out on its mesh).
    params = nnx.split(load_model(cfg.model, seed=cfg.train.seed))[1]
    again = evaluate(cfg, reg, model_state=params, num_examples=6, k=0, batch_size=8, seed=123, details=True)
    assert [s["greedy"] for s in again["samples"]] == [s["greedy"] for s in first["samples"]]
    for key in ("greedy/accuracy", "greedy/reward_mean", "greedy/completion_tokens_mean"):
        assert again[key] == first[key]
    assert again["sampled/pass@k"] is None and again["samples_per_example"] == 0


def test_other_parameters_give_other_answers_and_a_mismatched_state_is_an_error(tiny):
    from flax import nnx

    from rlpipe.models.loading import load_model

    reg, cfg, first = tiny
    other = nnx.split(load_model(cfg.model, seed=cfg.train.seed + 1))[1]
    changed = evaluate(cfg, reg, model_state=other, num_examples=6, k=0, batch_size=8, details=True)
    assert [s["greedy"] for s in changed["samples"]] != [s["greedy"] for s in first["samples"]]
    with pytest.raises(ValueError, match="structure"):
        evaluate(cfg, reg, model_state={"not": np.zeros(3)}, num_examples=1, k=0)


# -- with an oracle engine: exact metrics ----------------------------------------------------


class OracleEngine:
    """Answers the reverse task by reading the prompt.  Greedy: always right.
    Sampled (``n`` rows per example, in order): sample ``j`` of example ``i`` is
    right when ``j < i % (n + 1)``, so example ``i`` has ``i % (n + 1)`` correct."""

    def __init__(self, n: int):
        self.n, self.sampled_rows = n, 0
        self.tok = CharTokenizer()

    def generate(self, state, prompt_tokens, prompt_mask, key, params, *, sharding=None):
        rows, width = prompt_tokens.shape[0], params.max_new_tokens
        tokens = np.full((rows, width), params.pad_id, np.int32)
        mask = np.zeros((rows, width), bool)
        for r in range(rows):
            prompt = self.tok.decode(prompt_tokens[r][prompt_mask[r].astype(bool)].tolist())
            answer = prompt[:-1][::-1]
            if params.temperature > 0:
                i, j = divmod(self.sampled_rows, self.n)
                self.sampled_rows += 1
                answer = answer if j < i % (self.n + 1) else "x" * len(answer)
            ids = (self.tok.encode(answer) + [self.tok.eos_id])[:width]
            tokens[r, : len(ids)], mask[r, : len(ids)] = ids, True
        return Generation(tokens=tokens, mask=mask, logprobs=np.zeros((rows, width), np.float32))


def test_accuracy_and_pass_at_k_are_aggregated_exactly():
    n, k, m = 4, 2, 5
    oracle = OracleEngine(n)
    plugin = types.SimpleNamespace(rlpipe_rollout_engines=hookimpl(lambda: [RolloutEngineSpec(
        name="oracle", description="reads the answer off the prompt", factory=lambda graphdef, **kw: oracle)]))
    with register_plugin(plugin, name="oracle"):
        reg = load_registry(warn=lambda m: None)
        cfg = config(reg, {**SMALL, "roles": {"rollout": {"engine": "oracle", "max_new_tokens": 4}}})
        # batch_size 3 does not divide 20 sampled rows: the padded last call must not count.
        # An explicit one-device mesh (no placement plan) also works.
        one = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
        r = evaluate(cfg, reg, num_examples=m, k=k, num_samples=n, batch_size=3, mesh=one, details=True)
    correct = [i % (n + 1) for i in range(m)]  # 0, 1, 2, 3, 4 of 4 samples
    assert [s["sampled_correct"] for s in r["samples"]] == correct
    assert r["greedy/accuracy"] == 1.0 and r["greedy/correct"] == m
    # the greedy answer scores partial-match 1 and digits 1
    assert r["greedy/reward_mean"] == pytest.approx(2.0)
    assert r["sampled/accuracy"] == pytest.approx(sum(correct) / (n * m))
    hand = (0 + (1 - 3 / 6) + (1 - 1 / 6) + 1 + 1) / 5
    assert r["sampled/pass@k"] == pytest.approx(hand)
    # wrong samples ("xxx") still get no digits credit: correctness is the primary reward alone
    assert r["sampled/reward/digits"] == pytest.approx(r["sampled/accuracy"])
