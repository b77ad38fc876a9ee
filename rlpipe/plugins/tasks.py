"""rlpipe's built-in verifiable tasks, registered through the ``rlpipe`` entry point
``tasks``.

A task object yields examples: ``{"prompt": str, "answer": str, ...}``.  The
data source (:mod:`rlpipe.core.source`) tokenizes prompts and groups them into
items and global batches; reward functions score completions against
``example["answer"]``.

* ``reverse``: ``"123>"`` -> ``"321"``;
* ``sort``: ``"3142>"`` -> ``"1234"``;
* ``add``: ``"12+7="`` -> ``"19"``.

Each scores with its match reward plus ``digits`` (the share of the
completion's characters that are digits), a dense format signal: a randomly
initialised model almost never emits a digit, so the match alone stays at 0.

Each draws its examples from a seeded generator, so runs are reproducible,
and keeps a disjoint held-out split (examples whose hash puts them in it never
appear in training).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import attrs
import numpy as np

from rlpipe.core.config import check
from rlpipe.core.hookspecs import hookimpl
from rlpipe.core.specs import TaskSpec


@attrs.frozen(kw_only=True)
class DigitTaskConfig:
    """``task.options`` of the built-in digit tasks.

    Attributes:
        min_digits, max_digits: length range of the digit strings (operands for ``add``).
        eval_fraction: share of all possible prompts kept for evaluation only.
    """

    min_digits: int = attrs.field(default=3, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    max_digits: int = attrs.field(default=5, validator=check(lambda v: v >= 1, "must be at least 1, got {value}"))
    eval_fraction: float = attrs.field(default=0.1, validator=check(lambda v: 0 <= v < 1, "must be in [0, 1), got {value}"))

    def __attrs_post_init__(self) -> None:
        if self.max_digits < self.min_digits:
            from rlpipe.core.config import ConfigValueError

            raise ConfigValueError(f"must be at least min_digits ({self.min_digits}), got {self.max_digits}", ("max_digits",))


class DigitTask:
    """A seeded stream of digit-string examples with a held-out split."""

    def __init__(self, kind: str, config: DigitTaskConfig | None = None):
        self.kind = kind
        self.config = config or DigitTaskConfig()

    def _make(self, rng: np.random.Generator) -> dict[str, Any]:
        c = self.config
        n = int(rng.integers(c.min_digits, c.max_digits + 1))
        digits = "".join(str(d) for d in rng.integers(0, 10, size=n))
        if self.kind == "reverse":
            return {"prompt": f"{digits}>", "answer": digits[::-1]}
        if self.kind == "sort":
            return {"prompt": f"{digits}>", "answer": "".join(sorted(digits))}
        m = int(rng.integers(c.min_digits, c.max_digits + 1))
        a, b = int(digits), int("".join(str(d) for d in rng.integers(0, 10, size=m)))
        return {"prompt": f"{a}+{b}=", "answer": str(a + b)}

    def _held_out(self, prompt: str) -> bool:
        h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little")
        return (h % 10_000) < self.config.eval_fraction * 10_000

    def examples(self, *, seed: int, split: str = "train") -> Iterator[dict[str, Any]]:
        """An endless, seeded stream of examples of ``split`` (``train`` or ``eval``)."""
        rng = np.random.default_rng(seed)
        want_eval = split == "eval"
        while True:
            ex = self._make(rng)
            if self._held_out(ex["prompt"]) == want_eval:
                yield ex


def _factory(kind: str):
    return lambda options: DigitTask(kind, options)


@hookimpl
def rlpipe_tasks():
    yield TaskSpec(name="reverse", description="reverse a digit string: 123> -> 321", factory=_factory("reverse"),
                   config_type=DigitTaskConfig, rewards=("partial-match", "digits"))
    yield TaskSpec(name="sort", description="sort the digits: 3142> -> 1234", factory=_factory("sort"),
                   config_type=DigitTaskConfig, rewards=("partial-match", "digits"))
    yield TaskSpec(name="add", description="add two numbers: 12+7= -> 19", factory=_factory("add"),
                   config_type=DigitTaskConfig, rewards=("exact-match", "digits"))
