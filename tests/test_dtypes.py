"""Dtypes per purpose: the trainer (and critic) keep float32 master parameters
and optimizer state and compute in ``model.compute_dtype``; the rollout and
reference hold compute-dtype copies, cast from the master at weight sync."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import config

from rlpipe import Batch, BuildContext, StageContext
from rlpipe.roles import trainer as trainer_role
from rlpipe.runtime.planning import plan_run
from rlpipe.testing import fake_devices

P, G, N = 4, 2, 6


def items(seed=0, n_items=2):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_items):
        prompt = rng.integers(5, 90, size=(P, 5)).astype(np.int32)
        comp = rng.integers(5, 90, size=(P, G, N)).astype(np.int32)
        cmask = np.ones((P, G, N), np.int32)
        cmask[0, 1, 3:] = 0
        out.append(Batch(prompt_tokens=prompt, prompt_mask=np.ones_like(prompt), completion_tokens=comp, completion_mask=cmask,
                         rollout_logprobs=np.zeros((P, G, N), np.float32), rewards=rng.random((P, G)).astype(np.float32),
                         policy_version=np.zeros((P,), np.int32)))
    return out


def build(registry, cfg, role):
    planned = plan_run(cfg, registry, fake_devices(8))
    ctx = BuildContext(run_config=cfg, registry=registry, seed=cfg.train.seed)
    return planned.roles[role].factory(cfg.roles[role], planned.plan.role(role), context=ctx)


def bf16_config(registry, **model):
    return config(registry, {"model": {"compute_dtype": "bfloat16", **model},
                             "algorithm": {"name": "grpo", "options": {"kl_beta": 0.0}},
                             "roles": {"trainer": {"learning_rate": 1e-6, "micro_batch_size": 4}}})


def dtypes(tree):
    return {jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.slow
def test_bf16_compute_keeps_float32_masters_and_bf16_inference_copies(registry):
    cfg = bf16_config(registry)
    trainer = build(registry, cfg, "trainer")
    rollout = build(registry, cfg, "rollout")
    trainer.subscribe(rollout.load_weights)
    assert dtypes(trainer.params) == {jnp.dtype(jnp.float32)}
    assert dtypes(trainer.opt_state) == {jnp.dtype(jnp.float32)}  # AdamW's moments follow the master
    assert dtypes(rollout.holder.state) == {jnp.dtype(jnp.bfloat16)}
    # Same seed: the inference copy starts as the master's cast.
    for m, r in zip(jax.tree_util.tree_leaves(trainer.params), jax.tree_util.tree_leaves(rollout.holder.state)):
        np.testing.assert_array_equal(np.asarray(r), np.asarray(m.astype(jnp.bfloat16)))
    before = [np.asarray(x) for x in jax.tree_util.tree_leaves(trainer.params)]
    for i, b in enumerate(items()):
        trainer.process(b, context=StageContext(role="trainer", step=0, index=i))
    trainer.on_barrier(context=StageContext(role="trainer", step=0))
    after = jax.tree_util.tree_leaves(trainer.params)
    # An update of 1e-6 on weights near 0.02 is below half a bf16 ulp; a float32 master keeps it.
    changed = sum(int((a != np.asarray(b)).sum()) for a, b in zip(before, after))
    assert changed > 0.5 * sum(a.size for a in before)  # bf16 parameters: about 2% (those near 0)
    assert dtypes(trainer.params) == {jnp.dtype(jnp.float32)}
    assert rollout.holder.versions()[-1] == 1
    synced = jax.tree_util.tree_leaves(rollout.holder.version_state(1))
    for m, r in zip(after, synced):
        assert r.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(r), np.asarray(m.astype(jnp.bfloat16)))
    assert np.isfinite(trainer.last_metrics["loss"])


def test_reference_holds_a_compute_dtype_copy(registry):
    cfg = config(registry, {"model": {"compute_dtype": "bfloat16"}})
    reference = build(registry, cfg, "reference")
    assert dtypes(reference.holder.state) == {jnp.dtype(jnp.bfloat16)}
    assert reference.holder.dtype == jnp.bfloat16


def test_critic_keeps_float32_masters(registry):
    cfg = config(registry, {"model": {"compute_dtype": "bfloat16"}, "algorithm": {"name": "ppo"}, "roles": {"critic": {}}})
    critic = build(registry, cfg, "critic")
    assert dtypes(critic.params) == {jnp.dtype(jnp.float32)}
    assert dtypes(critic.opt_state) == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize(("model", "platform", "expected"), [
    ({}, "cpu", "float32"),
    ({}, "gpu", "bfloat16"),
    ({}, "tpu", "bfloat16"),
    ({}, None, "float32"),
    ({"dtype": "bfloat16"}, "cpu", "bfloat16"),  # an older bf16 config keeps computing in bf16
    ({"compute_dtype": "float32"}, "gpu", "float32"),
    ({"dtype": "bfloat16", "compute_dtype": "float32"}, "tpu", "float32"),
])
def test_compute_dtype_null_resolves_by_platform(registry, model, platform, expected):
    assert config(registry, {"model": model}).model.resolved_compute_dtype(platform) == expected


def test_compute_dtype_on_this_cpu(registry):
    from rlpipe.models.loading import compute_dtype

    assert compute_dtype(config(registry).model) == jnp.float32
    assert compute_dtype(config(registry, {"model": {"compute_dtype": "bfloat16"}}).model) == jnp.bfloat16


def test_trainer_memory_counts_float32_master_and_compute_dtype_activations(registry):
    from rlpipe.core.placement import MeshSpec

    mesh = MeshSpec((1, 1), ("fsdp", "tp"))
    f32 = config(registry, {"model": {"compute_dtype": "float32"}})
    bf16 = config(registry, {"model": {"compute_dtype": "bfloat16", "dtype": "bfloat16"}})
    a = trainer_role.estimate_memory(f32.roles["trainer"], f32, mesh)
    b = trainer_role.estimate_memory(bf16.roles["trainer"], bf16, mesh)
    assert a.parameters == b.parameters and a.optimizer_state == b.optimizer_state == 2 * a.parameters
    assert a.gradients == b.gradients == a.parameters
    assert b.activations < a.activations
