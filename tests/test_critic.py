"""The critic role: per-token values, the clipped value loss, and training on returns."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import config

from rlpipe import Batch, BuildContext, StageContext
from rlpipe.core.placement import MeshSpec, RolePlacement
from rlpipe.roles.critic_stage import clipped_value_loss

P, G, N = 2, 2, 5


def test_clipped_value_loss_matches_numpy():
    rng = np.random.default_rng(0)
    v, old, ret = (rng.normal(size=(4, N)).astype(np.float32) for _ in range(3))
    mask = (rng.random((4, N)) > 0.3).astype(np.float32)
    clipped = old + np.clip(v - old, -0.2, 0.2)
    expected = (0.5 * np.maximum((v - ret) ** 2, (clipped - ret) ** 2) * mask).sum() / mask.sum()
    assert float(clipped_value_loss(jnp.asarray(v), jnp.asarray(old), jnp.asarray(ret), jnp.asarray(mask), 0.2)) == pytest.approx(expected, rel=1e-5)
    assert float(clipped_value_loss(jnp.asarray(v), jnp.asarray(old), jnp.asarray(ret), jnp.zeros((4, N)), 0.2)) == 0.0


def item(seed):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(5, 90, size=(P, 4)).astype(np.int32)
    cmask = np.ones((P, G, N), np.int32)
    cmask[1, 0, 2:] = 0
    return Batch(prompt_tokens=prompt, prompt_mask=np.ones_like(prompt),
                 completion_tokens=rng.integers(5, 90, size=(P, G, N)).astype(np.int32), completion_mask=cmask,
                 rewards=np.array([[1.0, 0.0], [0.0, 1.0]], np.float32))


@pytest.mark.slow
def test_critic_produces_values_and_learns_the_returns(registry):
    cfg = config(registry, {"algorithm": {"name": "ppo"}, "roles": {"critic": {"learning_rate": 3e-3, "micro_batch_size": 2}}})
    placement = RolePlacement(name="critic", devices=[0], mesh=MeshSpec((1, 1), ("fsdp", "tp")))
    critic = registry.roles["critic"].factory(cfg.roles["critic"], placement, context=BuildContext(run_config=cfg, registry=registry))
    losses = []
    for step in range(6):
        out = critic.process(item(0), context=StageContext(role="critic", step=step, index=0))
        assert out["values"].shape == (P, G, N)
        assert (out["values"][1, 0, 2:] == 0).all()  # masked tokens have no value
        critic.on_barrier(context=StageContext(role="critic", step=step))
        losses.append(critic.last_metrics["value_loss"])
    assert losses[-1] < 0.5 * losses[0]
