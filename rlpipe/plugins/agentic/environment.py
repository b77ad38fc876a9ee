"""Environments: what the policy talks to in an agentic rollout.

An environment object holds **one episode**.  The rollout creates one per
episode with the ``rlpipe_environments`` plugin's factory, calls
:meth:`Environment.reset` with the task's example, then alternates: the
policy generates a turn (its *action*), :meth:`Environment.step` answers with
an observation, a reward and whether the episode is over.  The episode's
reward is the sum of the rewards ``step`` returned.

Layout of one episode in the rollout's fields (``completion_tokens`` and its
masks, ``[prompts, generations, roles.rollout.max_new_tokens]``)::

    prompt_tokens | reset obs | turn 1 | obs 1 | turn 2 | ... | padding
    loss mask       0           1        0       1              0
    attention       1           1        1       1              0
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, ContextManager, NamedTuple, Protocol, runtime_checkable

import attrs

from rlpipe.core.config import check


class Step(NamedTuple):
    """What :meth:`Environment.step` returns (a plain 3-tuple works as well)."""

    observation: str
    reward: float
    done: bool


@runtime_checkable
class Environment(Protocol):
    """One episode of an environment.

    An implementation must guarantee:

    * ``reset`` is called once, before any ``step``; it returns the text shown
      to the policy after the prompt and before its first turn ("" for none);
    * ``step(action)`` takes the policy's turn as text (special tokens
      dropped) and returns ``(observation, reward, done)``; after ``done`` it
      is not called again;
    * a problem the *policy* caused (a malformed tool call, a failing tool)
      is an observation, not an exception: an exception fails the episode
      (it is counted in ``rollout/episodes_failed`` and masked out of the
      loss).

    Optional members, used when present:

    * ``max_turns: int`` and ``max_tokens: int``: the environment's own
      episode limits (the rollout takes the smaller of these and its config);
    * ``action_end(text) -> int | None``: where the action in a generated turn
      ends, when before its end (just after a tool call): the rest of the turn
      is discarded, as if generation had stopped there;
    * ``metrics() -> Mapping[str, float]``: per-episode numbers, averaged per
      step as ``rollout/episode/<name>`` (the tool environment reports
      ``tool_calls``, ``tool_errors`` and ``success``).

    Example:
        >>> class Guess:
        ...     max_turns = 3
        ...     def reset(self, example):
        ...         self.answer = example["answer"]
        ...         return ""
        ...     def step(self, action):
        ...         if action.strip() == self.answer:
        ...             return Step("", 1.0, True)
        ...         return Step(" wrong, again: ", 0.0, False)
        >>> env = Guess()
        >>> env.reset({"prompt": "2+2=", "answer": "4"})
        ''
        >>> env.step("5"), env.step("4")
        (Step(observation=' wrong, again: ', reward=0.0, done=False), Step(observation='', reward=1.0, done=True))
    """

    def reset(self, example: Mapping[str, Any]) -> str: ...

    def step(self, action: str) -> tuple[str, float, bool]: ...


def _no_span(name: str, **args: Any) -> ContextManager[None]:
    return contextlib.nullcontext()


@attrs.frozen(kw_only=True)
class EnvironmentContext:
    """What an environment factory may use besides its options; keyword-only.

    Attributes:
        run_config: the whole resolved run config.
        registry: the plugin registry (tools, tool parsers, reward functions).
        tokenizer: the policy's tokenizer.
        seed: a seed for this episode alone (a function of the run's seed, the
            step, the item and the episode), for stochastic environments.
        episode: the episode's index within its item.
        span: ``span(name, **args)``: a context manager recording a span on the
            rollout's timeline track (the tool environment records ``tool``);
            a no-op outside a run.
    """

    run_config: Any
    registry: Any
    tokenizer: Any = None
    seed: int = 0
    episode: int = 0
    span: Callable[..., ContextManager[None]] = _no_span


@attrs.frozen(kw_only=True)
class EnvironmentSection:
    """``roles.rollout.environment``: makes the rollout agentic.

    Attributes:
        name: the environment plugin (``rlpipe_environments``): ``tool``,
            ``single-turn``, or a plugin's.
        options: the environment's options, typed by the environment.
        max_turns: the most policy turns per episode (the environment may
            allow fewer); an episode still running after them is truncated.
        max_turn_tokens: tokens generated per turn; ``null``:
            ``roles.rollout.max_new_tokens``.  ``roles.rollout.max_new_tokens``
            is the whole episode's budget (policy and environment tokens).
        timeout_s: the most seconds an episode may spend in its environment
            (``reset`` and ``step`` calls, tools included); an episode over it
            fails (counted, masked out of the loss).  ``null``: no limit.
        reuse_cache: keep each episode's KV cache between its turns, so a turn
            prefills only the new observation (engines with cache sessions,
            such as the built-in ``jax``); false prefills the whole context
            every turn.
        workers: threads running environment calls at once, across the
            episodes in flight (each episode's calls stay in order); 1 runs
            them one after another.  Environments must not share mutable
            state unless it is thread-safe.
    """

    name: str = attrs.field(validator=check(bool, "must be an environment name"))
    options: Any = None
    max_turns: int = attrs.field(default=4, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    max_turn_tokens: int | None = attrs.field(default=None, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    timeout_s: float | None = attrs.field(default=None, validator=check(lambda v: v > 0, "must be positive, got {value}"))
    reuse_cache: bool = True
    workers: int = attrs.field(default=8, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))


def environment_options(section: EnvironmentSection, registry: Any, path: str = "roles.rollout.environment") -> Any:
    """The environment's spec and its options structured by the environment's
    ``config_type`` (its defaults when ``options`` is null).

    Raises:
        ConfigError: unknown environment, or options it does not accept, at
            ``<path>.name`` / ``<path>.options...``.
    """
    from rlpipe.core.config import structure
    from rlpipe.core.errors import ConfigError, Problem

    spec = registry.get("rlpipe_environments", section.name, path=f"{path}.name")
    raw = section.options
    if spec.config_type is None:
        if raw not in (None, {}):
            raise ConfigError(Problem(f"{path}.options", f"environment {section.name!r} takes no options"))
        return spec, None
    if attrs.has(type(raw)) and isinstance(raw, spec.config_type):
        return spec, raw
    return spec, structure({} if raw is None else raw, spec.config_type, (*path.split("."), "options"))
