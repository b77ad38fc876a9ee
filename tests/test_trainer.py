"""The trainer stage: sharded updates equal single-device ones, gradients move
the policy the right way, weights are published, state offloads."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import config

from rlpipe import Batch, BuildContext, StageContext
from rlpipe.core.placement import MeshSpec, RolePlacement
from rlpipe.models.decoder import sequence_logprobs
from rlpipe.models.generation import left_pad
from rlpipe.runtime import weights

P, G, N = 4, 2, 6


def items(seed=0, n_items=2):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_items):
        prompt = rng.integers(5, 90, size=(P, 5)).astype(np.int32)
        comp = rng.integers(5, 90, size=(P, G, N)).astype(np.int32)
        cmask = np.ones((P, G, N), np.int32)
        cmask[0, 1, 3:] = 0  # a short completion
        out.append(Batch(prompt_tokens=prompt, prompt_mask=np.ones_like(prompt), completion_tokens=comp, completion_mask=cmask,
                         rollout_logprobs=np.zeros((P, G, N), np.float32), rewards=rng.random((P, G)).astype(np.float32),
                         policy_version=np.zeros((P,), np.int32)))
    return out


def trainer(registry, devices, shape, algorithm_options=None, **trainer_cfg):
    cfg = config(registry, {"algorithm": {"name": "grpo", "options": {"kl_beta": 0.0, **(algorithm_options or {})}},
                            # null restores the schema defaults whatever the embedded default run uses
                            "roles": {"trainer": {"learning_rate": 1e-2, "micro_batch_size": 4, "mini_batch_size": None,
                                                  "num_iterations": None, **trainer_cfg}}})
    placement = RolePlacement(name="trainer", devices=devices, mesh=MeshSpec(shape, ("fsdp", "tp")))
    spec = registry.roles["trainer"]
    return spec.factory(cfg.roles["trainer"], placement, context=BuildContext(run_config=cfg, registry=registry, seed=0))


def run_step(t, batch_items, step=0):
    for i, b in enumerate(batch_items):
        t.process(b, context=StageContext(role="trainer", step=step, index=i))
    t.on_barrier(context=StageContext(role="trainer", step=step))


@pytest.mark.parametrize("shape", [(2, 4), (8, 1)])
@pytest.mark.slow
def test_updates_on_8_devices_equal_the_single_device_ones(registry, shape):
    one, many = trainer(registry, [0], (1, 1)), trainer(registry, list(range(8)), shape)
    for step in range(2):
        run_step(one, items(step), step)
        run_step(many, items(step), step)
        assert many.last_metrics["loss"] == pytest.approx(one.last_metrics["loss"], abs=1e-5)
        assert many.last_metrics["grad_norm"] == pytest.approx(one.last_metrics["grad_norm"], rel=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(many.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)  # Adam amplifies float noise on near-zero gradients; lr is 1e-2
    assert any(not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(many.params))


@pytest.mark.slow
def test_positive_advantage_raises_and_negative_lowers_the_logprob(registry):
    t = trainer(registry, [0], (1, 1), learning_rate=3e-3)
    batch = items(0, n_items=1)[0]
    rewards = np.zeros((P, G), np.float32)
    rewards[:, 0] = 1.0  # generation 0 is better in every group
    batch = Batch({**dict(batch), "rewards": rewards})

    def logp():
        prompt, pmask = left_pad(batch["prompt_tokens"], batch["prompt_mask"], 16)
        model = nnx.merge(t.graphdef, t.params)
        out = sequence_logprobs(model, np.repeat(prompt, G, 0), np.repeat(pmask, G, 0),
                                batch["completion_tokens"].reshape(P * G, N), batch["completion_mask"].reshape(P * G, N))
        return np.asarray(out).reshape(P, G, N).sum(-1)

    before = logp()
    run_step(t, [batch])
    change = logp() - before
    assert (change[:, 0] > 0).all() and (change[:, 1] < 0).all()
    assert t.version == 1


@pytest.mark.slow
def test_published_weights_reach_subscribers_with_the_new_version(registry):
    t = trainer(registry, [0], (1, 1))
    got = []
    t.subscribe(lambda params, version: got.append((version, params)))
    run_step(t, items(0))
    run_step(t, items(1), step=1)
    assert [v for v, _ in got] == [1, 2]
    assert got[-1][1] is t.params


@pytest.mark.slow
def test_iterations_and_mini_batches_set_the_number_of_updates(registry):
    t = trainer(registry, [0], (1, 1), num_iterations=3, mini_batch_size=8)  # 2 items x 4 prompts x 2 = 16 rows
    run_step(t, items(0))
    counts = [int(x) for path, x in jax.tree_util.tree_leaves_with_path(t.opt_state) if "count" in jax.tree_util.keystr(path)]
    assert counts and set(counts) == {3 * 2}


def test_bad_batch_splits_are_errors_naming_the_keys(registry):
    t = trainer(registry, [0], (1, 1), mini_batch_size=6)
    with pytest.raises(ValueError, match="mini_batch_size"):
        run_step(t, items(0))


@pytest.mark.slow
def test_offload_moves_params_and_optimizer_state_to_host_and_back(registry):
    t = trainer(registry, [0], (1, 1))
    run_step(t, items(0))
    expected = [np.asarray(x) for x in jax.tree_util.tree_leaves((t.params, t.opt_state))]
    t.offload()
    assert weights.device_bytes((t.params, t.opt_state)) == 0
    t.onload()
    for a, b in zip(jax.tree_util.tree_leaves((t.params, t.opt_state)), expected):
        np.testing.assert_array_equal(np.asarray(a), b)
    run_step(t, items(1), step=1)  # and it still trains
    assert t.version == 2


@pytest.mark.slow
def test_entropy_metric_is_the_sampled_distributions_mean_token_entropy(registry):
    t = trainer(registry, [0], (1, 1), num_iterations=1)
    batch_items = items(0)
    model = nnx.merge(t.graphdef, t.params)
    # numpy reference from the full-sequence logits (temperature 1, the default)
    ents, counts = 0.0, 0
    for b in batch_items:
        prompt, pmask = left_pad(b["prompt_tokens"], b["prompt_mask"], 16)
        comp, cmask = b["completion_tokens"].reshape(P * G, N), b["completion_mask"].reshape(P * G, N)
        tokens = np.concatenate([np.repeat(prompt, G, 0), comp], 1)
        mask = np.concatenate([np.repeat(pmask, G, 0), cmask], 1).astype(bool)
        positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
        logits, _ = model.forward(tokens, positions, mask)
        z = np.asarray(logits, np.float64)[:, 15:-1]
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        h = -(p * np.log(p)).sum(-1)
        ents += (h * cmask).sum()
        counts += cmask.sum()
    run_step(t, batch_items)
    # micro-batches of 4 rows are averaged with equal weight; all but one row are full, so this is close
    assert t.last_metrics["entropy"] == pytest.approx(ents / counts, rel=2e-3)


@pytest.mark.slow
def test_non_finite_updates_are_skipped_counted_and_abort_the_run_past_the_limit(registry):
    import attrs
    import jax.numpy as jnp

    from rlpipe.roles.optimization import NonFiniteLossError

    t = trainer(registry, [0], (1, 1), max_skipped_updates=1)
    loss = t.algorithm.loss

    def poisoned(logp, rows):  # a NaN loss whenever a batch holds token 99 (as a diverging model would give)
        value, metrics = loss(logp, rows)
        return value + jnp.where(jnp.any(rows["completion"] == 99), jnp.nan, 0.0), metrics

    t.algorithm = attrs.evolve(t.algorithm, loss=poisoned) if attrs.has(type(t.algorithm)) else t.algorithm
    if t.algorithm.loss is not poisoned:
        object.__setattr__(t.algorithm, "loss", poisoned)
    bad = [Batch({**dict(b), "completion_tokens": np.full_like(b["completion_tokens"], 99)}) for b in items(0)]
    before = [np.asarray(x) for x in jax.tree_util.tree_leaves((t.params, t.opt_state))]
    run_step(t, bad)
    assert t.last_metrics["skipped_updates"] == 1 and t.version == 1
    for a, b in zip(jax.tree_util.tree_leaves((t.params, t.opt_state)), before):
        np.testing.assert_array_equal(np.asarray(a), b)  # untouched, not poisoned
    run_step(t, items(1), step=1)  # a good batch trains again
    assert t.last_metrics["skipped_updates"] == 1 and np.isfinite(t.last_metrics["loss"])
    with pytest.raises(NonFiniteLossError, match="max_skipped_updates = 1"):
        run_step(t, bad, step=2)


def test_optimizer_moments_are_sharded_like_the_parameters_from_the_start(registry):
    t = trainer(registry, list(range(8)), (8, 1))
    params = {jax.tree_util.keystr(p): x.sharding for p, x in jax.tree_util.tree_leaves_with_path(t.params)}
    moments = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(t.opt_state) if x.ndim]
    assert moments
    for key, x in moments:
        suffix = next(k for k in params if key.endswith(k))
        assert x.sharding.is_equivalent_to(params[suffix], x.ndim), key
    assert any(not x.sharding.is_fully_replicated for _, x in moments)


@pytest.mark.slow
def test_the_entropy_bonus_raises_the_policys_entropy(registry):
    # Equal rewards: no advantage, so only the bonus can move the policy.
    equal = [Batch({**dict(b), "rewards": np.zeros((P, G), np.float32)}) for b in items(0)]
    entropies = {}
    for coef in (0.0, 0.5):
        t = trainer(registry, [0], (1, 1), algorithm_options={"entropy_coef": coef}, num_iterations=1)
        seen = []
        for step in range(3):
            run_step(t, equal, step)
            seen.append(t.last_metrics["entropy"])
        entropies[coef] = seen
        assert ("entropy_bonus" in t.last_metrics) == (coef > 0)
    assert entropies[0.0][2] == pytest.approx(entropies[0.0][0], abs=1e-5)  # nothing to learn without the bonus
    assert entropies[0.5][2] > entropies[0.5][0] + 1e-3


@pytest.mark.slow
def test_dynamic_sampling_leaves_groups_with_equal_rewards_out_of_the_loss(registry):
    """Groups whose rewards are all equal train exactly as if their completions
    were masked out; the share kept is reported."""
    batch_items = items(0)
    flat = [Batch({**dict(b), "rewards": np.where(np.arange(P)[:, None] == 1, 0.5, b["rewards"]).astype(np.float32)})
            for b in batch_items]  # group 1 of each item: every completion scores 0.5
    masked = [Batch({**dict(b), "completion_mask": np.where(np.arange(P)[:, None, None] == 1, 0, b["completion_mask"])})
              for b in flat]
    dropping = trainer(registry, [0], (1, 1), algorithm_options={"dynamic_sampling": True}, num_iterations=1)
    by_hand = trainer(registry, [0], (1, 1), num_iterations=1)
    run_step(dropping, flat)
    run_step(by_hand, masked)
    assert dropping.last_metrics["dynamic_sampling/kept_groups"] == pytest.approx(1 - 2 / (2 * P))
    assert "dynamic_sampling/kept_groups" not in by_hand.last_metrics
    for a, b in zip(jax.tree_util.tree_leaves(dropping.params), jax.tree_util.tree_leaves(by_hand.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
