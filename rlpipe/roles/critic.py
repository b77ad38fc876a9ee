"""The critic role: a value model producing per-token values, trained at the barrier."""

from __future__ import annotations

import attrs

from rlpipe.core.config import RoleConfig, check
from rlpipe.core.specs import RoleSpec


@attrs.frozen(kw_only=True)
class CriticConfig(RoleConfig):
    """``roles.critic``: placement keys plus the value model's training.

    Attributes:
        learning_rate: the critic optimizer's learning rate.
        micro_batch_size: items per forward/backward pass.
    """

    learning_rate: float = attrs.field(default=1e-5, validator=check(lambda v: v > 0, "must be positive, got {value}"))
    micro_batch_size: int = attrs.field(default=8, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))


SPEC = RoleSpec(
    name="critic",
    description="per-token values from a value model (PPO/GAE); trains on returns at the global-batch barrier",
    config_type=CriticConfig,
    consumes={"prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "rewards"},
    produces={"values"},
    unavailable="rlpipe 0.1 can plan the critic role but cannot run it: its value-model stage is not implemented yet",
)
