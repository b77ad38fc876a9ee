"""The held-out examples an evaluation measures, and the pass@k estimator.

Shared by :mod:`rlpipe.app.evaluation` (single-turn) and
:mod:`rlpipe.app.agentic_evaluation` (episodes); the definitions of what is
measured are in :mod:`rlpipe.app.evaluation`'s docstring.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from rlpipe.core.errors import RunError
from rlpipe.core.plugins import Registry
from rlpipe.models.loading import load_tokenizer
from rlpipe.models.prompts import encode_prompt, fit_prompt
from rlpipe.runtime.run_config import RunConfig

#: :func:`evaluate` stops looking for more distinct examples after this many
#: draws in a row (or ten times ``num_examples``) brought none.
MAX_DRAWS_WITHOUT_NEW = 1000


class EvaluationError(RunError):
    """A reward function raised while scoring an evaluation sample (and
    ``roles.reward.on_error`` is ``fail``)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` are correct:
    ``1 - C(n - c, k) / C(n, k)``, computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _distinct(stream: Iterator[dict[str, Any]], count: int) -> Iterator[dict[str, Any]]:
    """The first ``count`` distinct examples (by prompt and answer) of ``stream``;
    fewer when ``MAX_DRAWS_WITHOUT_NEW`` draws in a row bring nothing new (a
    generated task whose held-out split is smaller than ``count``)."""
    seen: set[tuple[str, str]] = set()
    stale = 0
    while len(seen) < count and stale < max(MAX_DRAWS_WITHOUT_NEW, 10 * count):
        ex = next(stream, None)
        if ex is None:
            return
        key = (str(ex["prompt"]), str(ex.get("answer")))
        if key in seen:
            stale += 1
            continue
        seen.add(key)
        stale = 0
        yield ex


def evaluation_examples(config: RunConfig, registry: Registry, *, split: str, num_examples: int,
                        data_seed: int) -> tuple[list[dict[str, Any]], list[list[int]], int, int]:
    """The examples evaluation uses (see the module docstring) and their
    encoded, length-limited prompts: ``(examples, prompts, rejected,
    truncated)``."""
    task = registry.get("rlpipe_tasks", config.task.name, path="task.name").factory(config.task.options)
    size = getattr(task, "size", None)
    count = min(num_examples, size(split)) if callable(size) else num_examples
    tokenizer = load_tokenizer(config.model)
    examples, prompts = [], []
    rejected = truncated = 0
    for ex in _distinct(task.examples(seed=data_seed, split=split), count):
        ids = encode_prompt(tokenizer, ex)
        fitted = fit_prompt(ids, config.task.max_prompt_tokens, config.task.overlong_prompts)
        if fitted is None:
            rejected += 1
            continue
        truncated += len(fitted) < len(ids)
        examples.append(ex)
        prompts.append(fitted)
    return examples, prompts, rejected, truncated
