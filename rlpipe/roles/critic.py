"""The critic role: a value model (the policy's trunk, initialised from the
policy, plus a scalar head) producing per-token values, trained at the
global-batch barrier on the algorithm's returns with a clipped value loss."""

from __future__ import annotations

import attrs

from rlpipe.core.config import check
from rlpipe.core.specs import RoleSpec
from rlpipe.roles.trainer import OptimizedRoleConfig, optimized_memory


@attrs.frozen(kw_only=True)
class CriticConfig(OptimizedRoleConfig):
    """``roles.critic``: placement keys, its own optimizer (the keys of
    ``roles.trainer``'s optimizer) and the value clip.

    Attributes:
        learning_rate: the value model's (default 1e-5: a critic learns a new
            head and follows the policy, so it runs hotter than the policy's 1e-6).
        value_clip: how far a value may move from the one it had when the
            completion was scored, in the clipped value loss.
    """

    learning_rate: float = attrs.field(default=1e-5, validator=check(lambda v: v > 0, "must be positive, got {value}"))
    value_clip: float = attrs.field(default=0.2, validator=check(lambda v: v > 0, "must be positive, got {value}"))


def estimate_memory(config: CriticConfig, run_config, mesh):
    """The value model trained on whole micro-batches (the critic replicates
    its rows on the mesh): see :func:`rlpipe.roles.trainer.optimized_memory`."""
    return optimized_memory(config, run_config, mesh, rows=config.micro_batch_size, value_head=True)


def _factory(config: CriticConfig, placement, *, context):
    # Imported here so that listing roles does not load flax and optax.
    from rlpipe.roles.critic_stage import CriticStage
    from rlpipe.runtime.planning import make_algorithm

    _, algorithm = make_algorithm(context.run_config, context.registry)
    return CriticStage(config, placement, context=context, algorithm=algorithm)


SPEC = RoleSpec(
    name="critic",
    description="per-token values from a value model (PPO/GAE); trains on returns at the global-batch barrier",
    config_type=CriticConfig,
    consumes={"prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "rewards"},
    optional_consumes={"completion_attention_mask"},
    produces={"values"},
    factory=_factory,
    memory_estimate=estimate_memory,
)
