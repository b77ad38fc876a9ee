"""Scoring an episode's final answer with reward-function plugins.

The built-in environments score the policy's final answer the way the reward
role scores a plain completion: the weighted sum of reward functions
(``fn(prompt, completion, example) -> float``), by default the task's own.
An environment passes the episode along in the example, under ``"episode"``
(its actions, tool calls and, when the task gives a reference call, that
call as the environment's parser writes it), so a reward function can judge
how the answer was reached (``tool-call-match`` does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: A final answer is a success when the task's first reward function gives at
#: least this (the built-in match rewards give 1.0 for an exact answer).
SUCCESS_THRESHOLD = 1.0


class TaskRewards:
    """The reward terms an environment scores final answers with.

    Args:
        terms: ``[RewardTerm(name, weight)]`` (``roles.reward.functions``
            style); empty: the task's own reward functions, weight 1.
        path: the config path of ``terms``, for errors.

    Raises:
        ConfigError: a reward function that no plugin provides, or a task
            that names none while ``terms`` is empty.
    """

    def __init__(self, run_config: Any, registry: Any, terms: Sequence[Any] = (), *,
                 path: str = "roles.rollout.environment.options.rewards"):
        from rlpipe.core.errors import ConfigError, Problem

        task = run_config.task.name
        task_terms = registry.get("rlpipe_tasks", task, path="task.name").reward_terms
        if terms:
            named = [(t.name, float(t.weight), f"{path}[{i}].name") for i, t in enumerate(terms)]
        else:
            named = [(n, float(w), f"task {task!r}: reward function {i}") for i, (n, w) in enumerate(task_terms)]
        if not named:
            raise ConfigError(Problem(path, f"task {task!r} names no reward functions; list some here"))
        self.terms = [(n, w, registry.get("rlpipe_reward_functions", n, path=where).fn) for n, w, where in named]
        primary = task_terms[0][0] if task_terms else named[0][0]
        self.primary = primary
        self._primary_fn = registry.get("rlpipe_reward_functions", primary, path=f"task {task!r}: reward function 0").fn

    def score(self, prompt: str, answer: str, example: Mapping[str, Any]) -> tuple[float, dict[str, float], bool]:
        """``(total, {name: value}, success)`` of ``answer``: the weighted sum,
        each function's value, and whether the primary (the task's first)
        reward function reached :data:`SUCCESS_THRESHOLD`."""
        values = {name: float(fn(prompt, answer, example)) for name, _, fn in self.terms}
        total = sum(w * values[name] for name, w, _ in self.terms)
        primary = values[self.primary] if self.primary in values else float(self._primary_fn(prompt, answer, example))
        return total, values, primary >= SUCCESS_THRESHOLD
