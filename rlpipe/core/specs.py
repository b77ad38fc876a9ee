"""The typed records that plugins return from their hooks.

Each record names one thing a plugin provides (a role, a colocation policy, an
algorithm part, a task, ...).  Records are frozen attrs classes: the registry
keys them by ``name`` and reports two plugins claiming one name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from rlpipe.core.config import RoleConfig
    from rlpipe.core.memory import MemoryEstimate
    from rlpipe.core.placement import MeshSpec, Placement
    from rlpipe.core.stage import Stage


def _fields(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        raise TypeError("expected a collection of field names, got a single string")
    return frozenset(value)


def _check_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not value or not all(c.isalnum() or c in "-_" for c in value):
        raise ValueError(f"{type(instance).__name__}.name must be a non-empty string of letters, digits, '-' and '_', got {value!r}")


@attrs.frozen(kw_only=True)
class BuildContext:
    """What a role factory may use besides its config and placement; keyword-only.

    Attributes:
        run_config: the whole resolved run config (:class:`rlpipe.runtime.run_config.RunConfig`).
        registry: the plugin registry (to look up tasks, engines, ...).
        seed: the run's seed.
    """

    run_config: Any
    registry: Any
    seed: int = 0


@attrs.frozen(kw_only=True)
class RoleSpec:
    """A role: one kind of stage in the execution graph.

    The graph is derived from ``consumes`` and ``produces``: a role runs after
    the roles producing the fields it consumes.  Exactly one role (or the data
    source) may produce a given field.

    Attributes:
        name: the role's name, also its section under ``roles:`` in config.
        description: one line for ``rlpipe roles list``.
        config_type: an attrs class deriving from
            :class:`rlpipe.core.config.RoleConfig` that types ``roles.<name>``.
        consumes: fields the role needs; a missing producer is a graph error.
        optional_consumes: fields the role uses when some role produces them
            (the trainer uses ``ref_logprobs`` only when a reference runs).
        produces: fields the role adds to every item.
        factory: ``factory(config, placement, *, context) -> Stage``; ``None``
            for a role that can be planned but not run yet (``unavailable``
            says why).
        sink: the role at the end of the graph (the trainer).  Fields of
            roles nobody consumes flow into it.
        uses_devices: ``False`` for a role that works on the host CPU only
            (reward functions): it is placed like any role, but never
            offloaded and never time-shares devices, so its edges stream.
        memory_estimate: ``memory_estimate(config, run_config, mesh) ->
            MemoryEstimate | None``: what the role needs on *each* device of
            ``mesh`` (a :class:`rlpipe.core.placement.MeshSpec`), from shapes
            alone (no JAX arrays).  Planning calls it for the mesh the role is
            placed on (``auto`` also for meshes it considers) and shows the
            total as ``memory_estimate_bytes``.  ``None`` (the default), or a
            host role: no estimate, and the role counts 0 against capacity.
        configure: ``configure(config, *, run_config, registry) -> RoleSpec``:
            the spec to plan with for this config section, for a role whose
            fields depend on its options (the rollout with an environment also
            consumes ``example`` and produces ``episode_rewards`` and
            ``completion_attention_mask``).  It may raise
            :class:`rlpipe.core.errors.ConfigError` for options it cannot
            accept.  ``None`` (the default): the spec as registered.
    """

    name: str = attrs.field(validator=_check_name)
    description: str
    config_type: type[RoleConfig]
    consumes: frozenset[str] = attrs.field(converter=_fields, factory=frozenset)
    optional_consumes: frozenset[str] = attrs.field(converter=_fields, factory=frozenset)
    produces: frozenset[str] = attrs.field(converter=_fields, factory=frozenset)
    factory: Callable[..., Stage] | None = None
    sink: bool = False
    uses_devices: bool = True
    unavailable: str = ""
    memory_estimate: Callable[[RoleConfig, Any, MeshSpec], MemoryEstimate | None] | None = None
    configure: Callable[..., RoleSpec] | None = None


@attrs.frozen(kw_only=True)
class PolicySpec:
    """A colocation policy, selected by ``placement.policy``.

    Attributes:
        name: the value of ``placement.policy`` that selects it.
        description: one line for ``rlpipe placements list``.
        factory: ``factory(options) -> Placement``.
        config_type: an attrs class typing ``placement.options``, or ``None``
            for a policy without options.
    """

    name: str = attrs.field(validator=_check_name)
    description: str
    factory: Callable[[Any], Placement]
    config_type: type | None = None


@attrs.frozen(kw_only=True)
class AlgorithmSpec:
    """An RL algorithm, selected by ``algorithm.name``: the roles it needs and how
    its parts (advantage estimator, policy loss) are put together.

    Attributes:
        roles: roles the algorithm needs in the graph (PPO adds ``critic``).
        factory: ``factory(config) -> algorithm object`` (the Training issue
            defines that object's protocol).
    """

    name: str = attrs.field(validator=_check_name)
    description: str
    factory: Callable[..., Any]
    roles: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    config_type: type | None = None


@attrs.frozen(kw_only=True)
class AdvantageEstimatorSpec:
    """An advantage estimator (``grpo``, ``rloo``, ``gae``, ...): ``fn`` is a pure
    JAX function of the batch's rewards (and values) and masks."""

    name: str = attrs.field(validator=_check_name)
    description: str
    fn: Callable[..., Any]


@attrs.frozen(kw_only=True)
class PolicyLossSpec:
    """A policy loss (PPO clip, dual clip, GSPO, ...): ``fn`` is a pure JAX function."""

    name: str = attrs.field(validator=_check_name)
    description: str
    fn: Callable[..., Any]


@attrs.frozen(kw_only=True)
class RewardFunctionSpec:
    """A reward function, computed on the host: ``fn(prompt, completion, example) -> float``."""

    name: str = attrs.field(validator=_check_name)
    description: str
    fn: Callable[..., float]


@attrs.frozen(kw_only=True)
class TaskSpec:
    """A task: where prompts (and answers) come from, selected by ``task.name``.

    Attributes:
        factory: ``factory(config) -> task object`` yielding examples.
        rewards: names of the reward functions the task scores with by default;
            the first is the *primary* one, which decides whether an answer
            is correct.
        reward_weights: the weight of each of ``rewards``, in order (as
            ``roles.reward.functions`` would give them); empty: all 1.0.
        format_reward: the name of a reward function measuring whether a
            completion has the answer format the task asks for (1.0: it
            has); ``rlpipe eval`` reports its mean as ``greedy/format`` and
            ``sampled/format``.  ``None``: the task asks for no format.
    """

    name: str = attrs.field(validator=_check_name)
    description: str
    factory: Callable[..., Any]
    config_type: type | None = None
    rewards: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    reward_weights: tuple[float, ...] = attrs.field(default=(), converter=lambda v: tuple(float(w) for w in v))
    format_reward: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"task {self.name!r}: reward_weights has {len(self.reward_weights)} weights for "
                             f"{len(self.rewards)} reward functions")

    @property
    def reward_terms(self) -> tuple[tuple[str, float], ...]:
        """``(name, weight)`` of each default reward function."""
        return tuple(zip(self.rewards, self.reward_weights or (1.0,) * len(self.rewards)))


@attrs.frozen(kw_only=True)
class RolloutEngineSpec:
    """A generation backend used by the rollout role (the built-in pure-JAX engine,
    an external inference server, ...)."""

    name: str = attrs.field(validator=_check_name)
    description: str
    factory: Callable[..., Any]
    config_type: type | None = None


@attrs.frozen(kw_only=True)
class EnvironmentSpec:
    """An environment for agentic rollouts, selected by
    ``roles.rollout.environment.name`` (docs/agentic.md).

    Attributes:
        factory: ``factory(options, *, context) -> Environment``, called once
            per episode (an environment object holds one episode's state);
            ``context`` is a :class:`rlpipe.plugins.agentic.EnvironmentContext`.
        config_type: an attrs class typing
            ``roles.rollout.environment.options``, or ``None`` for an
            environment without options.
    """

    name: str = attrs.field(validator=_check_name)
    description: str
    factory: Callable[..., Any]
    config_type: type | None = None


def _schema(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("type", "object") != "object":
        raise TypeError(f"ToolSpec.parameters must be a JSON schema of an object (a dict with type 'object'), got {value!r}")
    return value


@attrs.frozen(kw_only=True)
class ToolSpec:
    """A tool that an environment lets the policy call.

    Attributes:
        parameters: a JSON schema of the arguments object (``{"type":
            "object", "properties": {...}, "required": [...]}``), shown to the
            model in the prompt and checked before ``fn`` runs.
        fn: ``fn(arguments: dict) -> str``: the result, shown to the model as
            an observation.  Whatever it raises is shown to the model as a
            tool error; the episode goes on.
    """

    name: str = attrs.field(validator=_check_name)
    description: str
    fn: Callable[[dict[str, Any]], str]
    parameters: dict[str, Any] = attrs.field(factory=lambda: {"type": "object", "properties": {}}, converter=_schema)

    def schema(self) -> dict[str, Any]:
        """The tool as the model sees it: ``{"name", "description", "parameters"}``."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@attrs.frozen(kw_only=True)
class ToolParserSpec:
    """A tool-call format (how calls are written, results shown and tools
    described), selected by the tool environment's ``parser`` option.

    Attributes:
        factory: ``factory() -> ToolParser`` (:class:`rlpipe.plugins.agentic.ToolParser`).
    """

    name: str = attrs.field(validator=_check_name)
    description: str
    factory: Callable[[], Any]
