"""The reference role: per-token log-probs of completions under a frozen policy."""

from __future__ import annotations

import attrs

from rlpipe.core.config import RoleConfig, check
from rlpipe.core.memory import MemoryEstimate
from rlpipe.core.specs import RoleSpec
from rlpipe.models import memory
from rlpipe.roles.rollout import data_parallel_rows, sequence_shape


@attrs.frozen(kw_only=True)
class ReferenceConfig(RoleConfig):
    """``roles.reference``: placement keys plus where the frozen policy comes from.

    Attributes:
        checkpoint: a local HF checkpoint directory; ``null`` uses the initial policy.
        micro_batch_size: items per forward pass.
    """

    checkpoint: str | None = None
    micro_batch_size: int = attrs.field(default=8, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))


def estimate_memory(config: ReferenceConfig, run_config, mesh) -> MemoryEstimate | None:
    """Parameters of the frozen policy (``checkpoint``'s shape if set) on
    ``mesh``, and one forward pass of ``micro_batch_size`` rows over prompt
    bucket plus completion, with logits at the completion's positions, all in
    the compute dtype (``model.compute_dtype``; ``null`` counts float32, the
    larger: estimates are made before devices are known).  The micro-batch's
    rows are split over the mesh's ``fsdp`` axis (rounded up to a multiple of
    its size), so each device holds ``ceil(micro_batch_size / fsdp)`` rows."""
    shape = memory.model_shape(run_config.model, config.checkpoint)
    if shape is None:
        return None
    b = memory.dtype_bytes(run_config.model.resolved_compute_dtype(None))
    prompt, completion = sequence_shape(run_config)
    return MemoryEstimate(
        parameters=memory.decoder_parameter_bytes(shape, mesh, b),
        activations=memory.forward_activation_bytes(shape, data_parallel_rows(config.micro_batch_size, mesh),
                                                    prompt + completion, b, logit_positions=completion),
    )


def _factory(config: ReferenceConfig, placement, *, context):
    # Imported here so that listing roles does not load flax.
    from rlpipe.roles.reference_stage import ReferenceStage

    return ReferenceStage(config, placement, context=context)


SPEC = RoleSpec(
    name="reference",
    description="per-token log-probs of the completions under the frozen initial policy (for the KL term)",
    config_type=ReferenceConfig,
    consumes={"prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask"},
    optional_consumes={"completion_attention_mask"},
    produces={"ref_logprobs"},
    factory=_factory,
    memory_estimate=estimate_memory,
)
