"""The reference role: per-token log-probs of completions under a frozen policy."""

from __future__ import annotations

import attrs

from rlpipe.core.config import RoleConfig, check
from rlpipe.core.specs import RoleSpec


@attrs.frozen(kw_only=True)
class ReferenceConfig(RoleConfig):
    """``roles.reference``: placement keys plus where the frozen policy comes from.

    Attributes:
        checkpoint: a local HF checkpoint directory; ``null`` uses the initial policy.
        micro_batch_size: items per forward pass.
    """

    checkpoint: str | None = None
    micro_batch_size: int = attrs.field(default=8, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))


def _factory(config: ReferenceConfig, placement, *, context):
    # Imported here so that listing roles does not load flax.
    from rlpipe.roles.inference import ReferenceStage

    return ReferenceStage(config, placement, context=context)


SPEC = RoleSpec(
    name="reference",
    description="per-token log-probs of the completions under the frozen initial policy (for the KL term)",
    config_type=ReferenceConfig,
    consumes={"prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask"},
    produces={"ref_logprobs"},
    factory=_factory,
)
