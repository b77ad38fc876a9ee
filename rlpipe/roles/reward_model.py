"""The reward-model role: a scalar score per completion from a learned reward model.

A device role like the reference: a decoder trunk with a one-label score head,
loaded from a Hugging Face sequence-classification checkpoint
(``LlamaForSequenceClassification``, ``Qwen2ForSequenceClassification``),
placed, colocated and offloaded by the plan like any other.  It scores
``prompt + completion`` per completion at the last real token, as transformers
does, and produces ``reward_model_scores`` ``[prompts, num_generations]``
(float32).  Not in the default config: a user adds ``roles.reward_model``.
The scores reach the trainer's batch (a role nobody consumes flows into the
sink); the reward role can weigh them into ``rewards``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from rlpipe.core.config import ConfigValueError, RoleConfig, check
from rlpipe.core.memory import MemoryEstimate
from rlpipe.core.specs import RoleSpec
from rlpipe.models import memory
from rlpipe.models.config import DecoderConfig
from rlpipe.roles.rollout import data_parallel_rows, sequence_shape


def _required(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not value:
        raise ConfigValueError("required: a local Hugging Face sequence-classification checkpoint directory "
                               "(LlamaForSequenceClassification or Qwen2ForSequenceClassification, num_labels 1)",
                               (attribute.name,))


@attrs.frozen(kw_only=True)
class RewardModelConfig(RoleConfig):
    """``roles.reward_model``: placement keys plus the reward model's checkpoint.

    Attributes:
        checkpoint: a local HF sequence-classification checkpoint directory
            with one label (required).  Its vocabulary must be the policy's:
            it scores the policy's token ids as they are.
        micro_batch_size: completions per forward pass.
    """

    checkpoint: str | None = attrs.field(default=None, validator=_required)
    micro_batch_size: int = attrs.field(default=8, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))


def checkpoint_shape(path: str) -> DecoderConfig | None:
    """The trunk's shape from ``path``'s ``config.json``; ``None`` when it cannot
    be read here (planning for another machine: building the role reports it)."""
    from rlpipe.models.hf import CheckpointError, classifier_config_from_hf

    try:
        hf = json.loads((Path(path) / "config.json").read_text())
        return classifier_config_from_hf(hf, source=str(Path(path) / "config.json"))
    except (OSError, ValueError, CheckpointError):
        return None


def estimate_memory(config: RewardModelConfig, run_config, mesh) -> MemoryEstimate | None:
    """The trunk's parameters on ``mesh`` plus the float32 score head, and one
    forward pass of ``micro_batch_size`` rows over prompt bucket plus
    completion without logits (the head is one number per row), in the compute
    dtype (``null`` counts float32).  Rows are split over the mesh's ``fsdp``
    axis, ``ceil(micro_batch_size / fsdp)`` per device."""
    shape = checkpoint_shape(config.checkpoint) if config.checkpoint else None
    if shape is None:
        return None
    b = memory.dtype_bytes(run_config.model.resolved_compute_dtype(None))
    prompt, completion = sequence_shape(run_config)
    return MemoryEstimate(
        parameters=memory.decoder_parameter_bytes(shape, mesh, b) + shape.hidden_size * 4,
        activations=memory.forward_activation_bytes(shape, data_parallel_rows(config.micro_batch_size, mesh),
                                                    prompt + completion, b, logit_positions=0),
    )


def _factory(config: RewardModelConfig, placement, *, context):
    # Imported here so that listing roles does not load flax.
    from rlpipe.roles.reward_model_stage import RewardModelStage

    return RewardModelStage(config, placement, context=context)


SPEC = RoleSpec(
    name="reward_model",
    description="a learned reward model's score of each completion (an HF sequence-classification checkpoint)",
    config_type=RewardModelConfig,
    consumes={"prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask"},
    optional_consumes={"completion_attention_mask"},
    produces={"reward_model_scores"},
    factory=_factory,
    memory_estimate=estimate_memory,
)
