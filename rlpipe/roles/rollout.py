"""The rollout role: generates completions for prompts with the current policy."""

from __future__ import annotations

import attrs

from rlpipe.core.config import RoleConfig, check
from rlpipe.core.specs import RoleSpec


@attrs.frozen(kw_only=True)
class RolloutConfig(RoleConfig):
    """``roles.rollout``: placement keys plus sampling.

    Attributes:
        engine: the rollout-engine plugin that generates.
        num_generations: completions per prompt (a GRPO group).
        max_new_tokens: generation budget per completion.
        temperature: sampling temperature; 0 is greedy.
        top_k: keep the k most likely tokens; 0 keeps all.
        top_p: nucleus sampling mass; 1.0 keeps all.
    """

    engine: str = "jax"
    num_generations: int = attrs.field(default=4, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    max_new_tokens: int = attrs.field(default=32, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    temperature: float = attrs.field(default=1.0, validator=check(lambda v: v >= 0, "must be at least 0, got {value}"))
    top_k: int = attrs.field(default=0, validator=check(lambda v: v >= 0, "must be at least 0 (0 keeps all tokens), got {value}"))
    top_p: float = attrs.field(default=1.0, validator=check(lambda v: 0 < v <= 1, "must be in (0, 1], got {value}"))


SPEC = RoleSpec(
    name="rollout",
    description="generates completions (and their log-probs and rewards) with the current policy",
    config_type=RolloutConfig,
    consumes={"prompt_tokens", "prompt_mask"},
    produces={"completion_tokens", "completion_mask", "rollout_logprobs", "policy_version", "rewards"},
    unavailable="rlpipe 0.1 can plan the rollout role but cannot run it: its KV-cache generation stage is not implemented yet",
)
