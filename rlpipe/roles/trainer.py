"""The trainer role: the policy update, and the sink of the stage graph."""

from __future__ import annotations

import attrs

from rlpipe.core.config import RoleConfig, check
from rlpipe.core.memory import MemoryEstimate
from rlpipe.core.specs import RoleSpec
from rlpipe.models import memory
from rlpipe.roles.rollout import sequence_shape


@attrs.frozen(kw_only=True)
class OptimizedRoleConfig(RoleConfig):
    """Placement keys plus an optimizer: the base of the trainer's and critic's sections.

    Attributes:
        learning_rate: peak learning rate.
        micro_batch_size: rows (completions) per forward/backward pass.
        optimizer: ``adamw`` or ``sgd``.
        b1, b2, weight_decay: AdamW's parameters.
        schedule: ``constant`` or ``warmup-cosine`` (to 0 at the last step).
        warmup_steps: linear warm-up updates.
        grad_clip: clip gradients to this global norm; 0 disables.
    """

    learning_rate: float = attrs.field(default=1e-6, validator=check(lambda v: v > 0, "must be positive, got {value}"))
    micro_batch_size: int = attrs.field(default=8, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    optimizer: str = attrs.field(default="adamw", validator=check(lambda v: v in ("adamw", "sgd"), "must be 'adamw' or 'sgd', got {value}"))
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = attrs.field(default=0.0, validator=check(lambda v: v >= 0, "must be at least 0, got {value}"))
    schedule: str = attrs.field(default="constant", validator=check(lambda v: v in ("constant", "warmup-cosine"), "must be 'constant' or 'warmup-cosine', got {value}"))
    warmup_steps: int = attrs.field(default=0, validator=check(lambda v: v >= 0, "must be at least 0, got {value}"))
    grad_clip: float = attrs.field(default=1.0, validator=check(lambda v: v >= 0, "must be at least 0, got {value}"))


@attrs.frozen(kw_only=True)
class TrainerConfig(OptimizedRoleConfig):
    """``roles.trainer``: placement keys, the optimizer (see
    :class:`OptimizedRoleConfig`) and the update schedule.

    Attributes:
        mini_batch_size: rows per optimizer update; gradients accumulate over
            micro-batches up to it; ``null`` is the whole global batch.
        num_iterations: passes over each global batch.
        max_skipped_updates: an update whose loss or gradient is not finite is
            skipped (parameters and optimizer state unchanged) and counted;
            the run stops with an error once more than this many were skipped.
        remat: rematerialise each decoder layer in the backward pass (the
            layers run as a checkpointed scan): activation memory of one layer
            instead of all of them, at the cost of recomputing each layer's forward pass (not timed here).  Turn it
            on for real model sizes (docs/performance.md §10).
    """

    mini_batch_size: int | None = attrs.field(default=None, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    num_iterations: int = attrs.field(default=1, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    max_skipped_updates: int = attrs.field(default=10, validator=check(lambda v: v >= 0, "must be at least 0, got {value}"))
    remat: bool = False

    def run_problems(self, run_config, *, path: str = "roles.trainer") -> list:
        """The batch arithmetic, checked by ``rlpipe config validate`` and
        ``rlpipe plan`` before any model is built: see :func:`batch_problems`."""
        return batch_problems(self, run_config, path=path)


def batch_problems(config: TrainerConfig, run_config, *, path: str = "roles.trainer") -> list:
    """How the trainer splits a global batch, from the config alone.

    A global batch holds ``train.items_per_step × train.prompts_per_item ×
    roles.rollout.num_generations`` rows (completions); ``mini_batch_size``
    must divide it and ``micro_batch_size`` must divide the mini-batch (the
    whole global batch when ``mini_batch_size`` is null), as
    :class:`rlpipe.roles.trainer_stage.TrainerStage` splits it.  Without a
    generating role the rows are unknown and nothing is checked.

    Returns:
        one :class:`rlpipe.core.errors.Problem` per key that does not divide,
        at ``<path>.mini_batch_size`` / ``<path>.micro_batch_size``.
    """
    from rlpipe.core.config import path_key
    from rlpipe.core.errors import Problem
    from rlpipe.roles.rollout import generating_section

    rollout = generating_section(run_config)
    generations = getattr(rollout, "num_generations", None)
    if not isinstance(generations, int):
        return []
    name = next((n for n, c in run_config.roles.items() if c is rollout), "rollout")
    t = run_config.train
    rows = t.items_per_step * t.prompts_per_item * generations
    origin = (f"train.items_per_step {t.items_per_step} × train.prompts_per_item {t.prompts_per_item} × "
              f"roles.{path_key(name)}.num_generations {generations}")
    mb, mini = config.micro_batch_size, config.mini_batch_size
    problems = []
    if mini is not None and rows % mini:
        problems.append(Problem(f"{path}.mini_batch_size",
                                f"{mini} does not divide the global batch of {rows} rows ({origin}){_nearest_divisors(rows, mini)}"))
    if mini is not None and mini % mb:
        problems.append(Problem(f"{path}.micro_batch_size",
                                f"{mb} does not divide the mini-batch of {mini} rows ({path}.mini_batch_size)"
                                f"{_nearest_divisors(mini, mb)}"))
    elif mini is None and rows % mb:
        problems.append(Problem(f"{path}.micro_batch_size",
                                f"{mb} does not divide the global batch of {rows} rows ({origin}; {path}.mini_batch_size "
                                f"is null: one update per global batch){_nearest_divisors(rows, mb)}"))
    return problems


def _nearest_divisors(n: int, value: int) -> str:
    """``; the nearest that divide it: 16 or 32``: the divisors of ``n`` just below and above ``value``."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    shown = [str(d) for d in (max((d for d in divisors if d < value), default=None),
                              min((d for d in divisors if d > value), default=None)) if d is not None]
    return f"; the nearest that divide it: {' or '.join(shown)}" if shown else ""


def optimized_memory(config: OptimizedRoleConfig, run_config, mesh, *, rows: int, value_head: bool = False) -> MemoryEstimate | None:
    """A role that trains a copy of the policy on ``mesh``: float32 master
    parameters, optimizer state (AdamW keeps two moments per parameter, in
    the parameter dtype — float32 — as optax creates them; SGD none), one set
    of float32 gradients, and a forward and backward pass of ``rows`` rows
    per device over prompt bucket plus completion in the compute dtype
    (``model.compute_dtype``; ``null`` counts float32, the larger, unless the
    mesh names real devices of another platform: estimates are made before
    devices are known).
    ``value_head``: the critic's trunk plus a replicated ``hidden + 1`` head,
    and no vocabulary logits.

    With ``model.lora`` (the policy, not the critic's value model) only the
    adapters train: the frozen base counts once, in the compute dtype, and
    the float32 adapters are what the optimizer state and gradients cover."""
    shape = memory.model_shape(run_config.model)
    if shape is None:
        return None
    master = memory.dtype_bytes("float32")
    resolve = getattr(run_config.model, "resolved_compute_dtype", None)
    compute = memory.dtype_bytes(resolve(_platform(mesh)) if resolve else run_config.model.dtype)
    lora = None if value_head else getattr(run_config.model, "lora", None)
    if lora is not None:
        trained = memory.lora_parameter_bytes(shape, lora, mesh, master)
        params = memory.decoder_parameter_bytes(shape, mesh, compute) + trained
    else:
        trained = params = memory.decoder_parameter_bytes(shape, mesh, master) + ((shape.hidden_size + 1) * master if value_head else 0)
    prompt, completion = sequence_shape(run_config)
    return MemoryEstimate(
        parameters=params,
        optimizer_state=2 * trained if config.optimizer == "adamw" else 0,
        gradients=trained,
        activations=memory.training_activation_bytes(shape, rows, prompt + completion, compute, logits=not value_head,
                                                     remat=getattr(config, "remat", False),
                                                     logit_positions=completion,
                                                     param_itemsize=compute if lora is not None else master),
    )


def _platform(mesh) -> str | None:
    """The platform of ``mesh``'s devices (``cpu``, ``gpu``, ``tpu``), or
    ``None`` for a mesh spec without devices (what planning passes)."""
    try:
        return getattr(mesh.devices.flat[0], "platform", None)
    except (AttributeError, IndexError, TypeError):
        return None


def estimate_memory(config: TrainerConfig, run_config, mesh) -> MemoryEstimate | None:
    """:func:`optimized_memory` with the trainer's rows per device: a
    micro-batch split over the ``fsdp`` axis when that divides it (as the
    trainer splits it), else the whole micro-batch."""
    fsdp = memory.mesh_axis_sizes(mesh).get("fsdp", 1)
    mb = config.micro_batch_size
    return optimized_memory(config, run_config, mesh, rows=mb // fsdp if fsdp > 1 and mb % fsdp == 0 else mb)


def _factory(config: TrainerConfig, placement, *, context):
    # Imported here so that listing roles does not load flax and optax.
    from rlpipe.roles.trainer_stage import TrainerStage
    from rlpipe.runtime.planning import make_algorithm

    _, algorithm = make_algorithm(context.run_config, context.registry)
    return TrainerStage(config, placement, context=context, algorithm=algorithm)


SPEC = RoleSpec(
    name="trainer",
    description="updates the policy from scored completions and publishes new weights at the global-batch barrier",
    config_type=TrainerConfig,
    consumes={"prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "rollout_logprobs", "rewards", "policy_version"},
    optional_consumes={"ref_logprobs", "values", "completion_attention_mask"},
    sink=True,
    factory=_factory,
    memory_estimate=estimate_memory,
)
