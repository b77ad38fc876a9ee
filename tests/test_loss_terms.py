"""The loss as a chain of terms (``rlpipe.plugins.algorithms.terms``): the
chain of the default terms is ``Algorithm.loss``; a plugin's term adds
exactly its contribution; the policy-gradient term can be swapped; metrics
carry no gradient."""

from __future__ import annotations

import re
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlpipe.plugins.algorithms import (
    Algorithm,
    AlgorithmConfig,
    LossInputs,
    chain,
    entropy_bonus,
    kl_penalty,
    make_factory,
    policy_gradient,
)
from rlpipe.plugins.algorithms import losses as L
from rlpipe.plugins.algorithms.presets import GRPOConfig

SHAPE = (2, 3, 5)

CONFIGS = [
    AlgorithmConfig(),
    AlgorithmConfig(aggregation="seq-mean-token-mean", kl_beta=0.04, kl_kind="k3", entropy_coef=0.01, dual_clip=2.0),
    AlgorithmConfig(aggregation="seq-mean-token-sum-norm", kl_beta=0.1, kl_kind="k2", tis_cap=1.5, eps_high=0.28),
    AlgorithmConfig(loss="gspo", eps_low=3e-4, eps_high=4e-4, kl_beta=0.05, kl_in_reward=True, entropy_coef=0.1),
]


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random(SHAPE) > 0.25
    mask[0, 0] = False  # a fully masked completion
    old = rng.normal(-2.0, 1.0, SHAPE).astype(np.float32)
    logp = (old + rng.normal(0, 0.4, SHAPE)).astype(np.float32)
    pad = lambda x: np.where(mask, x, np.nan).astype(np.float32)
    batch = {"completion_mask": mask.astype(np.int32), "old_logprobs": pad(old),
             "advantages": pad(rng.normal(size=SHAPE)), "ref_logprobs": pad(old + rng.normal(0, 0.3, SHAPE)),
             "rollout_logprobs": pad(old + rng.normal(0, 0.3, SHAPE))}
    entropy = rng.uniform(0.5, 2.0, SHAPE).astype(np.float32)
    return pad(logp), batch, entropy


def chain_from(cfg, policy_loss):
    """The chain of terms written out by hand from a config."""
    terms = [policy_gradient(policy_loss, aggregation=cfg.aggregation, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                             dual_clip=cfg.dual_clip, tis_cap=cfg.tis_cap),
             kl_penalty(cfg.kl_beta, kind=cfg.kl_kind, aggregation=cfg.aggregation, in_reward=cfg.kl_in_reward)]
    if cfg.entropy_coef > 0:
        terms.append(entropy_bonus(cfg.entropy_coef, aggregation=cfg.aggregation))
    return chain(*terms)


def assert_same(a, b):
    (la, ma), (lb, mb) = a, b
    assert set(ma) == set(mb)
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    for k in ma:
        np.testing.assert_array_equal(np.asarray(ma[k]), np.asarray(mb[k]), err_msg=k)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_the_chain_of_terms_is_algorithm_loss(cfg, seed):
    logp, batch, entropy = inputs(seed)
    algo = Algorithm(cfg)
    assert list(algo.terms) == ["policy_gradient", "kl_penalty", *(["entropy_bonus"] if cfg.entropy_coef > 0 else [])]
    by_hand = chain_from(cfg, {"ppo": L.ppo_clip, "gspo": L.gspo}[cfg.loss])
    got = algo.loss(logp, batch, entropy=entropy)
    assert_same(got, by_hand(LossInputs.create(logp, batch, entropy=entropy)))
    assert_same(got, algo.loss_terms(LossInputs.create(logp, batch, entropy=entropy)))
    # and the total is the sum of the terms' contributions
    parts = [t(LossInputs.create(logp, batch, entropy=entropy))[0] for t in algo.terms.values()]
    assert float(got[0]) == pytest.approx(float(sum(parts)), rel=1e-6)
    assert float(got[1]["loss"]) == float(got[0])


def length_penalty(weight):
    """weight * (token-mean of logp), as a plugin would write it."""
    def term(inputs):
        value = L.aggregate(inputs.logp, inputs.mask, "token-mean")
        return weight * value, {"mean_logp": value}
    return term


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_a_plugin_term_adds_exactly_its_contribution(cfg):
    logp, batch, entropy = inputs(3)
    plain = Algorithm(cfg)
    extended = Algorithm(cfg, terms=lambda t: {**t, "length": length_penalty(0.5)})
    assert list(extended.terms)[-1] == "length"
    (base, base_metrics), grad_base = jax.value_and_grad(plain.loss, has_aux=True)(logp, batch, entropy=entropy)
    (loss, metrics), grad = jax.value_and_grad(extended.loss, has_aux=True)(logp, batch, entropy=entropy)
    mask = batch["completion_mask"].astype(bool)
    mean_logp = np.where(mask, logp, 0).sum() / mask.sum()
    assert float(metrics["mean_logp"]) == pytest.approx(mean_logp, rel=1e-5)
    assert float(loss) == pytest.approx(float(base) + 0.5 * mean_logp, rel=1e-5, abs=1e-6)
    assert {k: float(v) for k, v in metrics.items() if k not in ("loss", "mean_logp")} == pytest.approx(
        {k: float(v) for k, v in base_metrics.items() if k != "loss"})
    # the gradient changes by exactly the term's: 0.5 / (number of valid tokens) on each valid token
    np.testing.assert_allclose(np.asarray(grad) - np.asarray(grad_base), np.where(mask, 0.5 / mask.sum(), 0.0), atol=1e-6)


def test_make_factory_passes_the_terms_on():
    logp, batch, entropy = inputs(4)
    algo = make_factory("grpo-plus", GRPOConfig, terms=lambda t: {**t, "length": length_penalty(1.0)})()
    assert algo.name == "grpo-plus" and "length" in algo.terms
    assert "mean_logp" in algo.loss(logp, batch, entropy=entropy)[1]


def test_the_policy_gradient_term_can_be_swapped():
    logp, batch, entropy = inputs(5)

    def vanilla_pg(inputs):
        adv = jnp.where(inputs.mask, inputs.batch["advantages"], 0.0)
        value = L.aggregate(-jnp.where(inputs.mask, inputs.logp, 0.0) * adv, inputs.mask, "token-mean")
        return value, {"pg_loss": jax.lax.stop_gradient(value)}

    cfg = AlgorithmConfig(kl_beta=0.1)
    algo = Algorithm(cfg, terms=lambda t: {**t, "policy_gradient": vanilla_pg})
    assert list(algo.terms) == ["policy_gradient", "kl_penalty"]
    loss, metrics = algo.loss(logp, batch, entropy=entropy)
    mask = batch["completion_mask"].astype(bool)
    pg = (np.where(mask, -logp * batch["advantages"], 0)).sum() / mask.sum()
    assert float(metrics["pg_loss"]) == pytest.approx(pg, rel=1e-5)
    assert float(loss) == pytest.approx(pg + 0.1 * float(metrics["kl"]), rel=1e-5)
    assert "ratio_mean" not in metrics and "clip_frac_low" not in metrics  # the PPO term is gone
    # a subclass overriding default_terms works the same way
    class VanillaPG(Algorithm):
        def default_terms(self):
            return {**super().default_terms(), "policy_gradient": vanilla_pg}
    assert_same(VanillaPG(cfg).loss(logp, batch, entropy=entropy), (loss, metrics))


TERMS = {
    "policy_gradient": policy_gradient(L.ppo_clip, aggregation="seq-mean-token-mean", eps_low=0.2, eps_high=0.28,
                                       dual_clip=2.0, tis_cap=1.5),
    "policy_gradient_gspo": policy_gradient(L.gspo, aggregation="token-mean", eps_low=3e-4, eps_high=4e-4),
    "kl_penalty": kl_penalty(0.1, kind="k3", aggregation="token-mean", in_reward=False),
    "kl_in_reward": kl_penalty(0.1, kind="k1", aggregation="token-mean", in_reward=True),
    "entropy_bonus": entropy_bonus(0.1, aggregation="seq-mean-token-sum"),
    "chain": chain(kl_penalty(0.1, kind="k2", aggregation="token-mean", in_reward=False), length_penalty(1.0)),
}


@pytest.mark.parametrize("name", list(TERMS))
def test_metrics_carry_no_gradient(name):
    logp, batch, entropy = inputs(6)
    term = TERMS[name]
    for key in term(LossInputs.create(logp, batch, entropy=entropy))[1]:
        def metric(lp, ent, key=key):
            return term(LossInputs.create(lp, batch, entropy=ent))[1][key]
        g_logp, g_ent = jax.grad(metric, argnums=(0, 1))(logp, entropy)
        np.testing.assert_array_equal(np.asarray(g_logp), 0.0, err_msg=key)
        np.testing.assert_array_equal(np.asarray(g_ent), 0.0, err_msg=key)
    # while the contribution (where there is one) does carry one
    g = jax.grad(lambda lp, ent: term(LossInputs.create(lp, batch, entropy=ent))[0], argnums=(0, 1))(logp, entropy)
    moved = any(np.any(np.asarray(x) != 0) for x in g)
    assert moved == (name != "kl_in_reward")


def test_terms_report_what_they_need_and_the_chain_catches_clashing_metrics():
    logp, batch, _ = inputs(7)
    no_ref = {k: v for k, v in batch.items() if k != "ref_logprobs"}
    with pytest.raises(KeyError, match="ref_logprobs"):
        TERMS["kl_penalty"](LossInputs.create(logp, no_ref))
    assert TERMS["kl_in_reward"](LossInputs.create(logp, no_ref))[1] == {}  # nothing to report, nothing needed
    with pytest.raises(KeyError, match="entropy"):
        TERMS["entropy_bonus"](LossInputs.create(logp, batch))
    with pytest.raises(ValueError, match="mean_logp"):
        chain(length_penalty(1.0), length_penalty(2.0))(LossInputs.create(logp, batch))
    with pytest.raises(TypeError, match="mapping"):
        Algorithm(AlgorithmConfig(), terms=lambda t: (*t.values(), length_penalty(1.0)))
    # nested chains: the outer loss wins
    loss, metrics = chain(chain(TERMS["kl_penalty"]), length_penalty(1.0))(LossInputs.create(logp, batch))
    assert float(metrics["loss"]) == float(loss)


def test_jit_and_grad_go_through_the_chain():
    logp, batch, entropy = inputs(8)
    algo = Algorithm(CONFIGS[1], terms=lambda t: {**t, "length": length_penalty(0.3)})
    eager = jax.value_and_grad(algo.loss, has_aux=True)(logp, batch, entropy=entropy)
    jitted = jax.jit(jax.value_and_grad(algo.loss, has_aux=True))(logp, batch, entropy=entropy)
    np.testing.assert_allclose(np.asarray(jitted[0][0]), np.asarray(eager[0][0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jitted[1]), np.asarray(eager[1]), rtol=1e-5, atol=1e-7)


def test_the_docs_loss_terms_example_runs(capsys):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "algorithms.md").read_text()
    section = doc[doc.index("## Losses are composed of terms"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    module = types.ModuleType("docs_loss_terms_example")
    exec(compile(code, "docs/algorithms.md", "exec"), module.__dict__)  # noqa: S102 - our own docs
    assert "positive_nll" in capsys.readouterr().out
    assert "positive_nll" in module.make_grpo_nll().terms


def test_ppo_kl_is_the_k3_kl_from_the_behaviour_policy():
    logp, batch, entropy = inputs(9)
    term = policy_gradient(L.ppo_clip, aggregation="seq-mean-token-mean", eps_low=0.2, eps_high=0.2)
    mask = batch["completion_mask"].astype(bool)
    on_policy = np.where(mask, batch["old_logprobs"], np.nan).astype(np.float32)
    assert float(term(LossInputs.create(on_policy, batch))[1]["ppo_kl"]) == 0.0
    d = np.where(mask, logp.astype(np.float64) - batch["old_logprobs"], 0.0)
    expected = (np.exp(d) - d - 1)[mask].mean()
    value = float(term(LossInputs.create(logp, batch))[1]["ppo_kl"])
    assert value > 0 and value == pytest.approx(expected, rel=1e-5)
    # On micro-batches with the mini-batch's normalisers the values sum to the whole batch's.
    norms = L.normalisers(batch["completion_mask"])
    halves = [(slice(0, 1), 0.5), (slice(1, 2), 0.5)]
    parts = [float(term(LossInputs.create(logp[s], {k: v[s] for k, v in batch.items()},
                                          normalisers=norms._replace(share=share)))[1]["ppo_kl"]) for s, share in halves]
    assert sum(parts) == pytest.approx(expected, rel=1e-5)
    # Every built-in algorithm reports it next to the clip fractions.
    for cfg in CONFIGS:
        _, metrics = Algorithm(cfg).loss(logp, batch, entropy=entropy)
        assert float(metrics["ppo_kl"]) == pytest.approx(expected, rel=1e-5), cfg
