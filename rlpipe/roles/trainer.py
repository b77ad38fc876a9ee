"""The trainer role: the policy update, and the sink of the stage graph."""

from __future__ import annotations

import attrs

from rlpipe.core.config import RoleConfig, check
from rlpipe.core.specs import RoleSpec


@attrs.frozen(kw_only=True)
class TrainerConfig(RoleConfig):
    """``roles.trainer``: placement keys plus the optimizer.

    Attributes:
        learning_rate: the policy optimizer's learning rate.
        micro_batch_size: items per forward/backward pass (gradients accumulate
            up to the global batch).
    """

    learning_rate: float = attrs.field(default=1e-5, validator=check(lambda v: v > 0, "must be positive, got {value}"))
    micro_batch_size: int = attrs.field(default=8, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))


SPEC = RoleSpec(
    name="trainer",
    description="updates the policy from scored completions and publishes new weights at the global-batch barrier",
    config_type=TrainerConfig,
    consumes={"prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "rollout_logprobs", "rewards", "policy_version"},
    optional_consumes={"ref_logprobs", "values"},
    sink=True,
    unavailable="rlpipe 0.1 can plan the trainer role but cannot run it: its optimizer stage is not implemented yet",
)
