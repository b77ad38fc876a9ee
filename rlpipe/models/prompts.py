"""Prompts for the pipeline: a task's examples, tokenized, length-limited and
grouped into items and global batches.

A task (a ``rlpipe_tasks`` plugin) yields examples, ``{"prompt": str,
"answer": str, ...metadata}``, optionally with ``messages`` (a chat
conversation, for few-shot prompts; :func:`encode_prompt`);
:func:`prompt_items` turns them into what the executor streams: a global
batch is ``items_per_step`` items, each holding ``prompts_per_item``
right-padded prompts with their examples.

Prompt-length limits (``task.max_prompt_tokens``, ``task.overlong_prompts``):

* ``truncate`` keeps the **last** ``max_prompt_tokens`` tokens of the encoded
  prompt (chat template included).  The end of a prompt holds the question
  and the template's generation prompt (the assistant header), so the model
  still sees what it is asked and where to answer; what is lost is the start
  (a system message, a long context, a BOS the template wrote).
* ``reject`` skips an overlong example and draws the next, so every batch is
  still full and only prompts that fit are trained on.

:class:`PromptCounters` counts both, for metrics.

Resuming at step *s* (``start_step=s``) yields exactly the batches the stream
from step 0 yields from its *s*-th on.  The skipped examples are drawn from the
task but not tokenized, except with ``reject`` and a limit: whether an
example was rejected depends on its length, so those are tokenized (but not
padded or batched).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import attrs
import numpy as np

from rlpipe.core.errors import DatasetError
from rlpipe.core.stage import Batch

#: The values of ``task.overlong_prompts``.
OVERLONG_POLICIES = ("truncate", "reject")

#: With ``reject``, this many rejections in a row (or two epochs of a finite
#: task, whichever is fewer) mean that (almost) no prompt fits: an error, not an
#: endless loop.
MAX_REJECTED_IN_A_ROW = 10_000


@attrs.define
class PromptCounters:
    """What :func:`prompt_items` did to the prompts it produced, cumulative
    since it started (examples skipped by ``start_step`` are not counted).

    Attributes:
        prompts: prompts placed in items.
        truncated: of those, how many were cut to ``max_prompt_tokens``.
        rejected: examples skipped because they were too long.
    """

    prompts: int = 0
    truncated: int = 0
    rejected: int = 0

    def metrics(self) -> dict[str, int]:
        """The counters as metrics-row entries (``data/...``)."""
        return {"data/prompts": self.prompts, "data/prompts_truncated": self.truncated,
                "data/prompts_rejected": self.rejected}


def prompt_messages(example: str | Mapping[str, Any]) -> list[dict[str, str]]:
    """The conversation an example asks the model to continue: its
    ``messages`` (chat turns ``{"role", "content"}``, ending with the user's
    question; earlier user/assistant turns are few-shot examples) when it has
    them, else its ``prompt`` as one user message.  A string is a prompt."""
    if isinstance(example, str):
        return [{"role": "user", "content": example}]
    messages = example.get("messages")
    if messages:
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    return [{"role": "user", "content": str(example["prompt"])}]


def encode_prompt(tokenizer: Any, example: str | Mapping[str, Any]) -> list[int]:
    """The prompt as the model sees it: :func:`prompt_messages` through the
    tokenizer's chat template with its generation prompt (the assistant
    header) when it has one; as plain text otherwise — the example's
    ``prompt`` (a task that gives ``messages`` also writes them out there).

    Args:
        example: a task's example (``prompt``, and maybe ``messages``), or a
            prompt string.
    """
    try:
        text = tokenizer.apply_chat_template(prompt_messages(example), add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a tokenizer without a chat template
        text = example if isinstance(example, str) else str(example["prompt"])
    return tokenizer.encode(text)


def _check_limits(max_prompt_tokens: int | None, overlong: str) -> None:
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {overlong!r}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be at least 1 or None, got {max_prompt_tokens}")


def fit_prompt(ids: list[int], max_prompt_tokens: int | None, overlong: Literal["truncate", "reject"] = "truncate") -> list[int] | None:
    """``ids`` limited to ``max_prompt_tokens``: unchanged when they fit (or there
    is no limit), else their last ``max_prompt_tokens`` tokens (``truncate``) or
    ``None`` (``reject``)."""
    _check_limits(max_prompt_tokens, overlong)
    if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
        return ids
    return ids[-max_prompt_tokens:] if overlong == "truncate" else None


def pad_prompts(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists as right-padded ``[rows, longest]`` int32 tokens and mask."""
    width = max(len(i) for i in ids)
    tokens = np.full((len(ids), width), pad_id, np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    for r, row in enumerate(ids):
        tokens[r, : len(row)] = row
        mask[r, : len(row)] = 1
    return tokens, mask


def prompt_items(task: Any, tokenizer: Any, *, seed: int, prompts_per_item: int, items_per_step: int,
                 split: str = "train", start_step: int = 0, max_prompt_tokens: int | None = None,
                 overlong: Literal["truncate", "reject"] = "truncate",
                 counters: PromptCounters | None = None) -> Iterator[list[Batch]]:
    """Global batches of items from ``task``: each item holds ``prompts_per_item``
    right-padded prompts (``prompt_tokens``, ``prompt_mask``) with their
    ``example`` (answer and metadata), ``example_id`` and ``group_id``
    (the prompt's position in the stream, counted from step 0).

    Args:
        seed: passed to ``task.examples``: the same seed gives the same stream.
        start_step: skip that many global batches first (to resume a run); the
            result equals the stream from 0 without its first ``start_step``
            batches.
        max_prompt_tokens: the longest prompt, in tokens (after the chat
            template); ``None``: no limit.
        overlong: what happens to a longer prompt: ``truncate`` keeps its last
            ``max_prompt_tokens`` tokens; ``reject`` skips the example.
        counters: updated as prompts are produced, for the caller's metrics.

    Raises:
        DatasetError: with ``reject``, so many prompts in a row were too long
            that (almost) none can fit.
    """
    _check_limits(max_prompt_tokens, overlong)
    if start_step < 0:
        raise ValueError(f"start_step must be at least 0, got {start_step}")
    counters = PromptCounters() if counters is None else counters
    examples = task.examples(seed=seed, split=split)
    per_step = prompts_per_item * items_per_step
    rejecting = max_prompt_tokens is not None and overlong == "reject"
    size = getattr(task, "size", None)
    give_up = min(MAX_REJECTED_IN_A_ROW, 2 * size(split)) if callable(size) else MAX_REJECTED_IN_A_ROW

    def fitting(*, count: bool) -> tuple[dict[str, Any], list[int]]:
        """The next example that fits and its (maybe truncated) token ids."""
        for in_a_row in itertools.count(1):
            ex = next(examples)
            ids = encode_prompt(tokenizer, ex)
            fitted = fit_prompt(ids, max_prompt_tokens, overlong)
            if fitted is not None:
                if count:
                    counters.prompts += 1
                    counters.truncated += len(fitted) < len(ids)
                return ex, fitted
            counters.rejected += count
            if in_a_row >= give_up:
                raise DatasetError(f"task {split} split: {in_a_row} prompts in a row are longer than "
                                   f"max_prompt_tokens={max_prompt_tokens} tokens (the last has {len(ids)}); "
                                   "raise task.max_prompt_tokens or set task.overlong_prompts=truncate")
        raise AssertionError("unreachable")

    skip = start_step * per_step
    if rejecting:
        for _ in range(skip):  # rejection depends on length: tokenize, but do not pad or batch
            fitting(count=False)
    else:
        for _ in itertools.islice(examples, skip):
            pass
    example_id = skip
    while True:
        items = []
        for _ in range(items_per_step):
            exs, ids = zip(*(fitting(count=True) for _ in range(prompts_per_item)))
            tokens, mask = pad_prompts(ids, tokenizer.pad_id)
            items.append(Batch(prompt_tokens=tokens, prompt_mask=mask,
                               group_id=np.arange(example_id, example_id + len(exs), dtype=np.int64),
                               example_id=np.arange(example_id, example_id + len(exs), dtype=np.int64),
                               example=np.array(exs, dtype=object)))
            example_id += len(exs)
        yield items
