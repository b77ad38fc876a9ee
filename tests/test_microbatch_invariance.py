"""Micro-batch invariance: the loss normalisers (valid tokens, valid
completions) are counted over the whole mini-batch before it is split, so one
update is the same whatever ``micro_batch_size`` — for every algorithm preset,
with completions of different lengths (and empty ones) that make each
micro-batch's own counts differ."""

import jax
import numpy as np
import pytest
from helpers import config

from rlpipe import Batch, BuildContext, StageContext
from rlpipe.core.placement import MeshSpec, RolePlacement
from rlpipe.plugins.algorithms import PRESETS, losses, make_factory

P, G, N = 4, 2, 6
ROWS = P * G


def item():
    rng = np.random.default_rng(7)
    prompt = rng.integers(5, 90, size=(P, 5)).astype(np.int32)
    comp = rng.integers(5, 90, size=(P, G, N)).astype(np.int32)
    lengths = np.array([[6, 1], [3, 0], [5, 2], [4, 6]])  # row 3 (prompt 1, generation 1) is empty
    cmask = (np.arange(N) < lengths[..., None]).astype(np.int32)
    rewards = rng.random((P, G)).astype(np.float32)
    rewards[2] = 0.5  # an uninformative group: DAPO's dynamic sampling drops it
    return Batch(prompt_tokens=prompt, prompt_mask=np.ones_like(prompt), completion_tokens=comp, completion_mask=cmask,
                 rollout_logprobs=rng.normal(-2.0, 0.3, (P, G, N)).astype(np.float32),
                 ref_logprobs=rng.normal(-2.0, 0.3, (P, G, N)).astype(np.float32),
                 values=rng.normal(0.0, 0.5, (P, G, N)).astype(np.float32),
                 rewards=rewards, policy_version=np.zeros((P,), np.int32))


def update(registry, name, micro_batch_size):
    """The parameter change of one SGD update (no clipping) on ``item()``, and its metrics."""
    options = {"entropy_coef": 0.01} if name == "grpo" else {}  # the entropy term too
    cfg = config(registry, {"algorithm": {"name": name, "options": options},
                            "roles": {"trainer": {"optimizer": "sgd", "grad_clip": 0.0, "learning_rate": 1.0,
                                                  "micro_batch_size": micro_batch_size, "mini_batch_size": None,
                                                  "num_iterations": None}}})
    placement = RolePlacement(name="trainer", devices=[0], mesh=MeshSpec((1, 1), ("fsdp", "tp")))
    from rlpipe.runtime.planning import make_algorithm

    _, algorithm = make_algorithm(cfg, registry)
    from rlpipe.roles.trainer_stage import TrainerStage

    t = TrainerStage(cfg.roles["trainer"], placement, context=BuildContext(run_config=cfg, registry=registry, seed=0),
                     algorithm=algorithm)
    before = [np.asarray(x) for x in jax.tree_util.tree_leaves(t.params)]
    t.process(item(), context=StageContext(role="trainer", step=0, index=0))
    t.on_barrier(context=StageContext(role="trainer", step=0))
    after = [np.asarray(x) for x in jax.tree_util.tree_leaves(t.params)]
    return [a - b for a, b in zip(after, before)], t.last_metrics


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.slow
def test_one_update_does_not_depend_on_the_micro_batch_size(registry, name):
    full, full_metrics = update(registry, name, ROWS)
    scale = max(float(np.abs(d).max()) for d in full)
    assert scale > 0
    for mb in (1, 2):
        delta, metrics = update(registry, name, mb)
        for a, b in zip(delta, full):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{name}, micro_batch_size={mb}")
        # The mini-batch's metrics are the same too (token means, the loss and its parts).
        for k in ("loss", "pg_loss", "ratio_mean", "entropy", "kl", "entropy_bonus"):
            if k in full_metrics:
                assert metrics[k] == pytest.approx(full_metrics[k], rel=1e-4, abs=1e-6), (name, mb, k)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_micro_batch_losses_sum_to_the_mini_batch_loss(aggregation):
    rng = np.random.default_rng(0)
    mask = rng.random((8, 6)) > 0.4
    mask[2] = False  # an empty completion
    per_token = rng.normal(size=mask.shape).astype(np.float32)
    whole = losses.aggregate(per_token, mask, aggregation)
    norms = losses.normalisers(mask, 0.25)
    parts = [losses.aggregate(per_token[i:i + 2], mask[i:i + 2], aggregation, normalisers=norms) for i in range(0, 8, 2)]
    np.testing.assert_allclose(sum(float(p) for p in parts), float(whole), rtol=1e-6)


def test_algorithm_loss_with_normalisers_sums_over_micro_batches():
    from rlpipe.roles.trainer_stage import _combine

    rng = np.random.default_rng(1)
    mask = rng.random((2, 4, 8)) > 0.3
    mask[0, 1] = False
    logp = rng.normal(-2.0, 0.5, mask.shape).astype(np.float32)
    batch = {"completion_mask": mask, "old_logprobs": logp + rng.normal(0, 0.1, mask.shape).astype(np.float32),
             "ref_logprobs": logp - 0.1, "advantages": rng.normal(size=mask.shape).astype(np.float32)}
    algo = make_factory("dapo")()
    whole, whole_metrics = algo.loss(logp, batch)
    norms = losses.normalisers(mask, 0.5)
    parts = [algo.loss(logp[i:i + 1], {k: v[i:i + 1] for k, v in batch.items()}, normalisers=norms) for i in range(2)]
    assert sum(float(p[0]) for p in parts) == pytest.approx(float(whole), rel=1e-5)
    combined = _combine([jax.tree_util.tree_map(np.asarray, p[1]) for p in parts])
    for k in ("pg_loss", "ratio_mean", "clip_frac_low", "clip_frac_high", "ratio_max"):
        assert float(combined[k]) == pytest.approx(float(whole_metrics[k]), rel=1e-5, abs=1e-7), k
