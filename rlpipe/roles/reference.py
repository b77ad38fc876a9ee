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
        micro_batch_size: completions (rows) per forward pass; a multiple of the group size scores each prompt once.
    """

    checkpoint: str | None = None
    micro_batch_size: int = attrs.field(default=8, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))


#: The roles that hold the policy's base weights with ``model.lora``.
_POLICY_ROLES = ("trainer", "actor", "rollout")


def shares_policy_base(config: ReferenceConfig, run_config) -> bool:
    """Whether the reference holds no weights of its own: with ``model.lora``
    and no ``checkpoint`` it is the base model, and on the devices and mesh of
    a policy role (no ``mesh`` of its own and, under the ``default`` placement
    policy, colocated with the trainer or the rollout) it evaluates that
    role's base arrays (:func:`rlpipe.roles.model_holder.shared_base`).
    Elsewhere (a disaggregated reference) it loads the base as without LoRA."""
    if getattr(run_config.model, "lora", None) is None or config.checkpoint or config.mesh is not None:
        return False
    return run_config.placement.policy == "default" and config.colocate_with in (None, *_POLICY_ROLES)


def estimate_memory(config: ReferenceConfig, run_config, mesh) -> MemoryEstimate | None:
    """Parameters of the frozen policy (``checkpoint``'s shape if set) on
    ``mesh``, and one forward pass of ``micro_batch_size`` rows over prompt
    bucket plus completion, with logits at the completion's positions, all in
    the compute dtype (``model.compute_dtype``; ``null`` counts float32, the
    larger: estimates are made before devices are known).  The micro-batch's
    rows are split over the mesh's ``fsdp`` axis (rounded up to a multiple of
    its size), so each device holds ``ceil(micro_batch_size / fsdp)`` rows.
    No parameters when it shares a policy role's base (:func:`shares_policy_base`)."""
    shape = memory.model_shape(run_config.model, config.checkpoint)
    if shape is None:
        return None
    b = memory.dtype_bytes(run_config.model.resolved_compute_dtype(None))
    prompt, completion = sequence_shape(run_config)
    return MemoryEstimate(
        parameters=0 if shares_policy_base(config, run_config) else memory.decoder_parameter_bytes(shape, mesh, b),
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
