"""The reward role: scores completions on the host with reward-function plugins.

A host role (``uses_devices=False``): it never holds device state, so its
edges never block, and it scores item *k* while the devices generate item
*k + 1*.  ``rewards`` is ``[prompts, num_generations]``: the weighted sum of
the configured reward functions.

After an agentic rollout (docs/agentic.md) the environment has scored each
episode (``episode_rewards``, with the task's reward functions by default):
``rewards`` is that plus the functions configured in ``functions`` — none
when it is empty, so the task's are not counted twice — which see the whole
episode's text (``completion_attention_mask``), tool calls and observations
included.

``terms`` adds fields of other roles to the reward: ``rewards += weight ×
batch[field]`` for each ``{field: weight}``, so a judge or a verifier shipped
as its own role (producing a ``[prompts, num_generations]`` field) counts
towards the reward without replacing this role.  :func:`_configure` makes the
role consume those fields, so the graph runs it after their producers;
planning checks that some role produces each
(:func:`rlpipe.runtime.planning.check_reward_terms`).  Each term's raw mean is
logged per step as ``reward/<field>``.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np

from rlpipe.core.config import RoleConfig, check
from rlpipe.core.errors import RunError
from rlpipe.core.specs import RoleSpec
from rlpipe.plugins.rewards import RewardTerm


@attrs.frozen(kw_only=True)
class RewardConfig(RoleConfig):
    """``roles.reward``: which reward functions, with which weights, and what to
    do when one raises.

    Attributes:
        functions: ``[{name, weight}]``; the reward is the weighted sum.  Empty
            (the default): the task's own reward functions, weight 1 — or,
            after an agentic rollout, none: the environment's episode reward.
        on_error: ``fail`` stops the run naming the function and the sample;
            ``zero`` scores that term 0 and counts the failure.
        terms: ``{field: weight}``: adds ``weight × batch[field]`` to each
            completion's reward, for fields other roles produce with shape
            ``[prompts, num_generations]`` (a judge's ``judge_scores``).
            Logged per step as ``reward/<field>`` (the field's mean).
    """

    functions: tuple[RewardTerm, ...] = ()
    terms: dict[str, float] = attrs.field(factory=dict, validator=check(
        lambda v: all(math.isfinite(w) for w in v.values()), "weights must be finite numbers, got {value}"))
    on_error: str = attrs.field(default="fail", validator=check(lambda v: v in ("fail", "zero"), "must be 'fail' or 'zero', got {value}"))


class RewardFunctionError(RunError):
    """A reward function raised on a sample (and ``on_error`` is ``fail``)."""


class RewardStage:
    """Decodes completions and scores them with the configured functions."""

    def __init__(self, config: RewardConfig, placement: Any, *, context: Any):
        from rlpipe.models.loading import load_tokenizer

        self.config = config
        self.tokenizer = load_tokenizer(context.run_config.model)
        self.terms = reward_terms(config, run_config=context.run_config, registry=context.registry)
        self.explicit = bool(config.functions)
        self.failures = 0
        self.scored = 0
        self.last_metrics: dict[str, float] = {}
        # Per term field: the sum of its values and their count since the last barrier.
        self._term_sums: dict[str, list[float]] = {f: [0.0, 0] for f in config.terms}

    def process(self, batch: Any, *, context: Any) -> Any:
        tokens = np.asarray(batch["completion_tokens"])
        # An agentic episode's text is every token of it, the environment's included.
        mask = np.asarray(batch["completion_attention_mask" if "completion_attention_mask" in batch else "completion_mask"]).astype(bool)
        prompts = np.asarray(batch["prompt_tokens"])
        pmask = np.asarray(batch["prompt_mask"]).astype(bool)
        examples = batch["example"]
        p, g, _ = tokens.shape
        rewards = np.zeros((p, g), np.float32)
        terms = self.terms
        if "episode_rewards" in batch:
            rewards += np.asarray(batch["episode_rewards"], np.float32)
            terms = self.terms if self.explicit else []
        for i in range(p if terms else 0):
            prompt = self.tokenizer.decode(prompts[i][pmask[i]].tolist())
            for j in range(g):
                completion = self.tokenizer.decode(tokens[i, j][mask[i, j]].tolist())
                for name, weight, fn in terms:
                    try:
                        value = float(fn(prompt, completion, examples[i]))
                    except Exception as exc:
                        if self.config.on_error == "fail":
                            raise RewardFunctionError(
                                f"reward function {name!r} raised on step {context.step}, micro-batch {context.index}, "
                                f"prompt {i}, generation {j} ({completion[:40]!r}): {type(exc).__name__}: {exc}") from exc
                        self.failures += 1
                        value = 0.0
                    rewards[i, j] += weight * value
        for field, weight in self.config.terms.items():
            values = term_values(batch, field, (p, g))
            rewards += np.float32(weight) * values
            acc = self._term_sums[field]
            acc[0] += float(values.sum(dtype=np.float64))
            acc[1] += values.size
        self.scored += p * g
        return batch.add(rewards=rewards)

    def on_barrier(self, *, context: Any) -> None:
        """The step's metrics: ``<field>`` (logged as ``reward/<field>``), each
        term field's mean over the step's completions (without its weight)."""
        self.last_metrics = {f: (s / n if n else float("nan")) for f, (s, n) in self._term_sums.items()}
        self._term_sums = {f: [0.0, 0] for f in self.config.terms}


def term_values(batch: Any, field: str, shape: tuple[int, int]) -> np.ndarray:
    """``batch[field]`` as float32 ``[prompts, num_generations]``.

    Raises:
        ValueError: the field has another shape (naming both).
    """
    values = np.asarray(batch[field], dtype=np.float32)
    if values.shape != tuple(shape):
        raise ValueError(f"roles.reward.terms.{field}: field {field!r} has shape {list(values.shape)}, but a reward "
                         f"term needs one value per completion, [prompts, num_generations] = {list(shape)}")
    return values


def reward_terms(config: RewardConfig, *, run_config: Any, registry: Any) -> list[tuple[str, float, Any]]:
    """``(name, weight, fn)`` of each reward function the role scores with:
    ``config.functions``, or the task's own (weight 1).

    Raises:
        ConfigError: an unknown reward function, at
            ``roles.reward.functions[i].name`` (or naming the task's).
    """
    terms, where = config.functions, "roles.reward.functions[{i}].name"
    if not terms:
        task = run_config.task.name
        terms = tuple(RewardTerm(name=n, weight=w) for n, w in registry.get("rlpipe_tasks", task, path="task.name").reward_terms)
        where = f"task {task!r}: reward function {{i}}"
    return [(t.name, t.weight, registry.get("rlpipe_reward_functions", t.name, path=where.format(i=i)).fn)
            for i, t in enumerate(terms)]


def _configure(config: RewardConfig, *, run_config: Any, registry: Any) -> RoleSpec:
    """Checks the reward functions when the run is planned, so that a
    misspelt name is an error of ``rlpipe config validate`` and ``plan``,
    not of the first step; consumes the fields of ``terms``."""
    reward_terms(config, run_config=run_config, registry=registry)
    # Consuming the term fields puts this role after their producers.
    return attrs.evolve(SPEC, configure=None, consumes=SPEC.consumes | set(config.terms))


def _factory(config: RewardConfig, placement: Any, *, context: Any) -> RewardStage:
    return RewardStage(config, placement, context=context)


SPEC = RoleSpec(
    name="reward",
    description="scores completions on the host with reward-function plugins, off the device's critical path",
    config_type=RewardConfig,
    consumes={"prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "example"},
    optional_consumes={"episode_rewards", "completion_attention_mask"},
    produces={"rewards"},
    uses_devices=False,
    factory=_factory,
    configure=_configure,
)
