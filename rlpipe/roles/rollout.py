"""The rollout role: generates completions for prompts with the current policy.

Produces, per item of ``P`` prompts: ``completion_tokens``, ``completion_mask``
and ``rollout_logprobs`` shaped ``[P, num_generations, max_new_tokens]``, and
``policy_version`` ``[P]``: the weights every completion was sampled with.

With ``environment`` set the rollout is *agentic* (docs/agentic.md): each
completion is a multi-turn episode with an environment plugin.  It then also
consumes ``example`` and produces ``completion_attention_mask`` (1 on every
token of the episode, the environment's included; ``completion_mask`` is 1
on the policy's tokens only) and ``episode_rewards`` ``[P,
num_generations]``, which the reward role adds to ``rewards``.
"""

from __future__ import annotations

import attrs

from rlpipe.core.config import RoleConfig, check
from rlpipe.core.memory import MemoryEstimate
from rlpipe.core.specs import RoleSpec
from rlpipe.models import memory
from rlpipe.plugins.agentic.environment import EnvironmentSection

#: What an agentic rollout adds to the rollout's fields.
AGENTIC_FIELDS = frozenset({"completion_attention_mask", "episode_rewards"})


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
        stop_tokens: token ids that end a completion, besides the tokenizer's
            end-of-sequence token.
        ignore_eos: no token ends a completion (neither the end-of-sequence
            token nor ``stop_tokens``): every completion is ``max_new_tokens``
            long.  For benchmarking the engine.
        refill_rows: continuous batching: decode at most this many rows at
            once, each refilled with the next pending completion as soon as
            its own ends (``Engine.generate_refill``); the completions equal
            those of generating all rows at once.  Pays off when completions
            end at very different lengths.  ``null``: every row at once.
            Single-turn rollouts with the rows on one device (agentic
            episodes already refill their rows turn by turn).
        environment: makes the rollout agentic: multi-turn episodes with this
            environment (:class:`rlpipe.plugins.agentic.environment.EnvironmentSection`);
            ``max_new_tokens`` is then each episode's budget, policy and
            environment tokens together.  ``null``: one completion per row.
        max_concurrency: agentic rollouts: the most episodes in flight at
            once (rows of one generation call); ``null``: every episode of an
            item.
    """

    engine: str = "jax"
    num_generations: int = attrs.field(default=4, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    max_new_tokens: int = attrs.field(default=32, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    temperature: float = attrs.field(default=1.0, validator=check(lambda v: v >= 0, "must be at least 0, got {value}"))
    top_k: int = attrs.field(default=0, validator=check(lambda v: v >= 0, "must be at least 0 (0 keeps all tokens), got {value}"))
    top_p: float = attrs.field(default=1.0, validator=check(lambda v: 0 < v <= 1, "must be in (0, 1], got {value}"))
    stop_tokens: tuple[int, ...] = ()
    ignore_eos: bool = False
    refill_rows: int | None = attrs.field(default=None, validator=check(lambda v: v >= 1, "must be at least 1 (or null: every row at once), got {value}"))
    environment: EnvironmentSection | None = None
    max_concurrency: int | None = attrs.field(default=None, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))

    def __attrs_post_init__(self) -> None:
        turn = self.environment.max_turn_tokens if self.environment is not None else None
        if turn is not None and turn > self.max_new_tokens:
            from rlpipe.core.config import ConfigValueError

            raise ConfigValueError(f"must be at most roles.rollout.max_new_tokens ({self.max_new_tokens}), the "
                                   f"episode's budget; got {turn}", ("environment", "max_turn_tokens"))

    def run_problems(self, run_config, *, path: str = "roles.rollout") -> list:
        """Checked by ``rlpipe config validate`` and ``rlpipe plan`` before any
        model is built: see :func:`generation_problems`."""
        return generation_problems(self, run_config, path=path)


#: The built-in advantage estimators that compare the completions of a prompt
#: with each other (a group of one gets advantage 0).
GROUP_ESTIMATORS = ("grpo", "drgrpo", "rloo", "reinforce-pp")


def generation_problems(config: RolloutConfig, run_config, *, path: str = "roles.rollout") -> list:
    """What the rollout's settings must satisfy given the rest of the run:

    * at least 2 ``num_generations`` for an algorithm whose advantages compare
      a prompt's completions (:data:`GROUP_ESTIMATORS`), or that drops groups
      of fewer than two (``algorithm.options.dynamic_sampling``);
    * ``task.max_prompt_tokens`` (when set) plus ``max_new_tokens`` within the
      model's ``max_position_embeddings`` (its preset, or ``model.path``'s
      ``config.json`` when readable here); an unknown ``model.preset`` too.

    Returns:
        one :class:`rlpipe.core.errors.Problem` each, at its key.
    """
    from rlpipe.core.errors import ConfigError, Problem

    problems = []
    options = run_config.algorithm.options
    advantage, name = getattr(options, "advantage", None), run_config.algorithm.name
    if config.num_generations < 2 and advantage in GROUP_ESTIMATORS:
        problems.append(Problem(f"{path}.num_generations", (
            f"{config.num_generations} completion per prompt, but algorithm {name!r} (advantage estimator {advantage!r}) "
            "compares the completions of each prompt: a group of one gets advantage 0 and nothing is learned; use at "
            "least 2")))
    elif config.num_generations < 2 and getattr(options, "dynamic_sampling", False):
        problems.append(Problem(f"{path}.num_generations", (
            f"{config.num_generations} completion per prompt, but algorithm.options.dynamic_sampling drops every group "
            "of fewer than 2 completions, so nothing is trained on; use at least 2")))
    try:
        shape = memory.model_shape(run_config.model)
    except ConfigError as exc:  # an unknown preset
        return [*problems, *exc.problems]
    limit = getattr(shape, "max_position_embeddings", None)
    prompt = getattr(run_config.task, "max_prompt_tokens", None)
    total = (prompt or 0) + config.max_new_tokens
    if limit is not None and total > limit:
        model = getattr(run_config.model, "path", None)
        model = f"model.path {model!r}" if model else f"model.preset {run_config.model.preset!r}"
        sum_text = (f"task.max_prompt_tokens {prompt} + {path}.max_new_tokens {config.max_new_tokens} = {total} tokens"
                    if prompt else f"{config.max_new_tokens} new tokens")
        problems.append(Problem(f"{path}.max_new_tokens", (
            f"{sum_text}, more than the {limit} positions of the model (max_position_embeddings of {model}); "
            "lower " + ("one of them" if prompt else "it"))))
    return problems


def generating_section(run_config):
    """The config section of the role that generates: ``roles.rollout``, else
    the first section that is a :class:`RolloutConfig` (a plugin role that
    reuses the rollout's settings under another name); ``None`` without one."""
    roles = run_config.roles
    if "rollout" in roles:
        return roles["rollout"]
    return next((c for c in roles.values() if isinstance(c, RolloutConfig)), None)


def sampling_temperature(run_config) -> float:
    """The temperature the rollout samples at, which every role that scores its
    completions (reference, trainer) must divide logits by too; greedy (0) and
    a run without a rollout role score the plain distribution (1)."""
    rollout = generating_section(run_config)
    return float(getattr(rollout, "temperature", 1.0) or 1.0)


def sequence_shape(run_config) -> tuple[int, int]:
    """``(prompt slots, completion tokens)`` the memory estimates assume for
    every role that sees a whole sequence: the prompt limit
    (``task.max_prompt_tokens``, else ``placement.assumed_prompt_tokens``)
    padded to its bucket, and the rollout's ``max_new_tokens``."""
    rollout = generating_section(run_config)
    new = getattr(rollout, "max_new_tokens", None) or attrs.fields(RolloutConfig).max_new_tokens.default
    prompt = getattr(run_config.task, "max_prompt_tokens", None) or run_config.placement.assumed_prompt_tokens
    return memory.prompt_bucket(prompt), int(new)


def data_parallel_rows(rows: int, mesh) -> int:
    """Rows each device of ``mesh`` holds when the inference roles split
    ``rows`` over its ``fsdp`` axis (padded to a multiple of its size)."""
    fsdp = memory.mesh_axis_sizes(mesh).get("fsdp", 1)
    return -(-rows // fsdp)


def estimate_memory(config: RolloutConfig, run_config, mesh) -> MemoryEstimate | None:
    """Parameters on ``mesh``; the KV cache of one item's rows in flight
    (``train.prompts_per_item × num_generations``) over prompt bucket plus
    ``max_new_tokens`` slots; the prefill's activations (one layer at a time,
    logits of the last position only).  Rows are split over the mesh's
    ``fsdp`` axis (data-parallel inference, padded to a multiple of its
    size), so each device holds the cache and activations of
    ``ceil(rows / fsdp)`` rows; ``tp`` does not divide them."""
    shape = memory.model_shape(run_config.model)
    if shape is None:
        return None
    b = memory.dtype_bytes(run_config.model.resolved_compute_dtype(None))
    prompt, new = sequence_shape(run_config)
    rows = run_config.train.prompts_per_item * config.num_generations
    slots = prompt + new
    if config.environment is not None:
        # A turn's context is the prompt and the episode so far (up to a whole
        # episode, in its bucket), plus the turn's own tokens; at most
        # max_concurrency episodes are in flight.  A cache kept between turns
        # (reuse_cache) has room for every context twice over and one turn
        # (rlpipe.plugins.agentic.episodes._CachedTurns), and a call copies up to all of
        # it for attention (rlpipe.models.generation._extend): twice that.
        rows = min(rows, config.max_concurrency or rows)
        prompt, new = memory.prompt_bucket(prompt + new), config.environment.max_turn_tokens or new
        slots = 2 * (2 * prompt + new) if config.environment.reuse_cache else prompt + new
    rows = data_parallel_rows(rows, mesh)
    return MemoryEstimate(
        parameters=memory.decoder_parameter_bytes(shape, mesh, b),
        kv_cache=memory.kv_cache_bytes(shape, rows, slots, b),
        activations=memory.forward_activation_bytes(shape, rows, prompt, b, keys=prompt + new, logit_positions=1),
    )


def _factory(config: RolloutConfig, placement, *, context):
    # Imported here so that listing roles does not load flax.
    from rlpipe.roles.rollout_stage import RolloutStage, SingleTurn

    if config.environment is None:
        return RolloutStage(config, placement, context=context, generator=SingleTurn)
    from rlpipe.plugins.agentic.rollout import EpisodeGenerator

    return RolloutStage(config, placement, context=context,
                        generator=lambda stage: EpisodeGenerator(stage, context=context))


def _configure(config: RolloutConfig, *, run_config, registry) -> RoleSpec:
    """The plain rollout's spec, or with an environment the agentic one: it
    also consumes ``example`` and produces :data:`AGENTIC_FIELDS`.

    The environment is checked here, when the run is planned: its name, its
    options, and one environment built from them, so that what its factory
    looks up (tools, tool parser, reward functions) is a config error of
    ``rlpipe plan`` and ``rlpipe config validate``, not a failure mid-run."""
    if config.environment is None:
        return SPEC
    from rlpipe.plugins.agentic.environment import (
        EnvironmentContext,
        environment_options,
    )

    spec, options = environment_options(config.environment, registry)
    spec.factory(options, context=EnvironmentContext(run_config=run_config, registry=registry))
    return attrs.evolve(SPEC, consumes=SPEC.consumes | {"example"}, produces=SPEC.produces | AGENTIC_FIELDS,
                        description="runs multi-turn episodes with an environment (and tools) with the current policy",
                        configure=None)


SPEC = RoleSpec(
    name="rollout",
    description="generates completions (and their log-probs and rewards) with the current policy",
    config_type=RolloutConfig,
    consumes={"prompt_tokens", "prompt_mask"},
    produces={"completion_tokens", "completion_mask", "rollout_logprobs", "policy_version"},
    factory=_factory,
    memory_estimate=estimate_memory,
    configure=_configure,
)
