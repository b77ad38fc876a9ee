"""The reward role: scores completions on the host with reward-function plugins."""

from __future__ import annotations

import attrs

from rlpipe.core.config import RoleConfig, check
from rlpipe.core.specs import RoleSpec


@attrs.frozen(kw_only=True)
class RewardConfig(RoleConfig):
    """``roles.reward``: placement keys (a host role: it never holds device
    state) plus what to do when a reward function raises.

    Attributes:
        on_error: ``fail`` stops the run naming the function and the sample;
            ``zero`` scores the sample 0 and counts the failure in the metrics.
    """

    on_error: str = attrs.field(default="fail", validator=check(lambda v: v in ("fail", "zero"), "must be 'fail' or 'zero', got {value}"))


SPEC = RoleSpec(
    name="reward",
    description="scores completions on the host with the task's reward functions, off the device's critical path",
    config_type=RewardConfig,
    consumes={"completion_tokens", "completion_mask", "example_id"},
    produces={"rewards"},
    uses_devices=False,
    unavailable="rlpipe can plan the reward role but cannot run it yet: reward-function plugins are not implemented",
)
