"""rlpipe's built-in verifiable tasks, registered through the ``rlpipe`` entry point
``tasks``.

A task object yields examples: ``{"prompt": str, "answer": str, ...}``.  The
data source (:mod:`rlpipe.core.source`) tokenizes prompts and groups them into
items and global batches; reward functions score completions against
``example["answer"]``.

* ``reverse``: ``"123>"`` -> ``"321"``;
* ``sort``: ``"3142>"`` -> ``"1234"``;
* ``add``: ``"12+7="`` -> ``"19"``;
* ``calculator``: ``"37*49="`` -> ``"1813"``, with a reference calculator
  call in each example (``tool_call``), for the ``tool`` environment
  (docs/agentic.md).

Each scores with its match reward plus ``digits`` (the share of the
completion's characters that are digits), a dense format signal: a randomly
initialised model almost never emits a digit, so the match alone stays at 0.

Each draws its examples from a seeded generator, so runs are reproducible,
and keeps a disjoint held-out split (examples whose hash puts them in it never
appear in training).

* ``jsonl``: a dataset of JSON objects, one a line (``{"prompt": ...,
  "answer": ...}`` plus any metadata), scored with ``math-answer`` by default.
  The whole file is checked when the task is built; see :class:`JsonlTask`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from rlpipe.core.config import check
from rlpipe.core.errors import DatasetError
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
        return held_out(prompt, self.config.eval_fraction)

    def examples(self, *, seed: int, split: str = "train") -> Iterator[dict[str, Any]]:
        """An endless, seeded stream of examples of ``split`` (``train`` or ``eval``)."""
        rng = np.random.default_rng(seed)
        want_eval = split == "eval"
        while True:
            ex = self._make(rng)
            if self._held_out(ex["prompt"]) == want_eval:
                yield ex


def held_out(text: str, fraction: float) -> bool:
    """Whether ``text`` belongs to the held-out split: a stable hash of the text
    (not of its position), so the split of a line never changes when lines
    are added, removed or reordered."""
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return (h % 10_000) < fraction * 10_000


def _factory(kind: str):
    return lambda options: DigitTask(kind, options)


# -- the agentic demo: arithmetic with a calculator ---------------------------------


@attrs.frozen(kw_only=True)
class CalculatorTaskConfig:
    """``task.options`` of the ``calculator`` task.

    Attributes:
        digits: each operand's length in digits (no leading zeros).
        operators: the operators to draw from, a non-empty subset of ``+-*``.
        eval_fraction: share of all possible prompts kept for evaluation only.
    """

    digits: int = attrs.field(default=2, validator=check(lambda v: 1 <= v <= 9, "must be in [1, 9], got {value}"))
    operators: str = attrs.field(default="*", validator=check(lambda v: v and set(v) <= set("+-*"),
                                                              "must be a non-empty string of + - *, got {value}"))
    eval_fraction: float = attrs.field(default=0.1, validator=check(lambda v: 0 <= v < 1, "must be in [0, 1), got {value}"))


class CalculatorTask:
    """``37*49=`` -> ``1813``: arithmetic a small model cannot do in its head.

    Each example also holds ``tool_call``, the reference call
    (``{"name": "calculator", "arguments": {"expression": "37*49"}}``), which
    the ``tool`` environment writes in its format for ``tool-call-match``.
    """

    def __init__(self, config: CalculatorTaskConfig | None = None):
        self.config = config or CalculatorTaskConfig()

    def _make(self, rng: np.random.Generator) -> dict[str, Any]:
        c = self.config

        def operand() -> int:
            return int(rng.integers(10 ** (c.digits - 1) if c.digits > 1 else 0, 10**c.digits))

        a, b = operand(), operand()
        op = c.operators[int(rng.integers(len(c.operators)))]
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        expression = f"{a}{op}{b}"
        return {"prompt": f"{expression}=", "answer": str(value),
                "tool_call": {"name": "calculator", "arguments": {"expression": expression}}}

    def examples(self, *, seed: int, split: str = "train") -> Iterator[dict[str, Any]]:
        """An endless, seeded stream of examples of ``split`` (``train`` or ``eval``)."""
        rng = np.random.default_rng(seed)
        want_eval = split == "eval"
        while True:
            ex = self._make(rng)
            if held_out(ex["prompt"], self.config.eval_fraction) == want_eval:
                yield ex


# -- JSONL datasets ------------------------------------------------------------------


#: At most this many bad lines are listed in one error (then a count of the rest).
MAX_REPORTED_PROBLEMS = 20


@attrs.frozen(kw_only=True)
class JsonlTaskConfig:
    """``task.options`` of the ``jsonl`` task.

    Attributes:
        path: the training file, one JSON object a line (relative paths are
            relative to the working directory).
        eval_path: a held-out file in the same format; ``null`` holds out
            ``eval_fraction`` of ``path`` instead.
        eval_fraction: without ``eval_path``, the share of ``path``'s prompts
            held out for evaluation, chosen by a stable hash of the prompt.
        prompt_field, answer_field: the keys holding the prompt and the answer;
            every other key is kept as metadata in the example.
        shuffle: reshuffle the training examples every epoch (under the run's
            seed); ``false`` keeps file order.
    """

    path: str = attrs.field(validator=check(bool, "must be a file path"))
    eval_path: str | None = attrs.field(default=None, validator=check(bool, "must be a file path or null"))
    eval_fraction: float = attrs.field(default=0.1, validator=check(lambda v: 0 <= v < 1, "must be in [0, 1), got {value}"))
    prompt_field: str = attrs.field(default="prompt", validator=check(bool, "must be a key name"))
    answer_field: str = attrs.field(default="answer", validator=check(bool, "must be a key name"))
    shuffle: bool = True


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def read_jsonl(path: str | Path, *, prompt_field: str = "prompt", answer_field: str = "answer") -> list[dict[str, Any]]:
    """Every example of a JSONL file, checked whole before anything is used.

    Each non-blank line must be a JSON object whose ``prompt_field`` is a
    non-empty string and whose ``answer_field`` is a string or a number
    (numbers become their decimal text).  An example is ``{"prompt", "answer",
    **metadata}``: the object's other keys are kept as they are, except that
    with other field names a key literally named ``prompt`` or ``answer`` is
    replaced by the canonical one.

    Raises:
        DatasetError: the file cannot be read, or some lines are not examples:
            one line per problem, ``<path>:<line>: <reason>``.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{p}: dataset file not found (working directory {Path.cwd()})") from None
    except IsADirectoryError:
        raise DatasetError(f"{p}: is a directory, expected a JSONL file") from None
    except OSError as exc:
        raise DatasetError(f"{p}: cannot read dataset file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{p}:{line}: not UTF-8 text (byte {exc.start} of the file)") from None
    examples, problems = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{p}:{number}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: expected a JSON object, got {_kind(obj)}")
            continue
        bad = []
        keys = ", ".join(map(repr, obj)) or "none"
        prompt, answer = obj.get(prompt_field), obj.get(answer_field)
        if prompt_field not in obj:
            bad.append(f"missing prompt field {prompt_field!r} (keys: {keys})")
        elif not isinstance(prompt, str):
            bad.append(f"prompt field {prompt_field!r} must be a string, got {_kind(prompt)}")
        elif not prompt.strip():
            bad.append(f"prompt field {prompt_field!r} is empty")
        if answer_field not in obj:
            bad.append(f"missing answer field {answer_field!r} (keys: {keys})")
        elif isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            bad.append(f"answer field {answer_field!r} must be a string or a number, got {_kind(answer)}")
        if bad:
            problems.extend(f"{where}: {b}" for b in bad)
            continue
        meta = {k: v for k, v in obj.items() if k not in (prompt_field, answer_field)}
        examples.append({**meta, "prompt": prompt, "answer": answer if isinstance(answer, str) else str(answer)})
    if problems:
        more = len(problems) - MAX_REPORTED_PROBLEMS
        shown = problems[:MAX_REPORTED_PROBLEMS] + ([f"{p}: ... and {more} more bad line(s)"] if more > 0 else [])
        raise DatasetError("\n".join(shown))
    return examples


class JsonlTask:
    """Examples from a JSONL file, with a held-out split.

    Both files are read and checked when the task is built (so a bad line
    stops the run before any device work, never mid-run).  The ``train``
    split repeats over epochs, reshuffled each epoch from the seed when
    ``shuffle`` is on; the ``eval`` split is ``eval_path``, or else the lines
    of ``path`` whose prompt's hash falls in ``eval_fraction`` (a prompt that
    appears twice is on one side only), in file order, repeated.
    """

    def __init__(self, config: JsonlTaskConfig):
        self.config = config
        fields = {"prompt_field": config.prompt_field, "answer_field": config.answer_field}
        data = read_jsonl(config.path, **fields)
        if config.eval_path is not None:
            self.splits = {"train": data, "eval": read_jsonl(config.eval_path, **fields)}
        else:
            self.splits = {"train": [ex for ex in data if not held_out(ex["prompt"], config.eval_fraction)],
                           "eval": [ex for ex in data if held_out(ex["prompt"], config.eval_fraction)]}
        if not self.splits["train"]:
            why = "it has no examples" if not data else f"every prompt is held out (eval_fraction={config.eval_fraction})"
            raise DatasetError(f"{config.path}: no training examples: {why}")

    def size(self, split: str = "train") -> int:
        """How many distinct examples ``split`` has (one epoch)."""
        return len(self._split(split))

    def _split(self, split: str) -> list[dict[str, Any]]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r} (splits: train, eval)")
        return self.splits[split]

    def examples(self, *, seed: int, split: str = "train") -> Iterator[dict[str, Any]]:
        """An endless stream of ``split``'s examples, epoch after epoch (each a fresh dict).

        Raises:
            DatasetError: (at the call, not at the first ``next``) ``split`` is empty.
        """
        data = self._split(split)
        if not data:
            source = self.config.eval_path or f"{self.config.path} (eval_fraction={self.config.eval_fraction})"
            raise DatasetError(f"{source}: the {split} split has no examples")
        return self._stream(data, seed, self.config.shuffle and split == "train")

    @staticmethod
    def _stream(data: list[dict[str, Any]], seed: int, shuffle: bool) -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(len(data)) if shuffle else range(len(data))
            for i in order:
                yield dict(data[i])


@hookimpl
def rlpipe_tasks():
    yield TaskSpec(name="reverse", description="reverse a digit string: 123> -> 321", factory=_factory("reverse"),
                   config_type=DigitTaskConfig, rewards=("partial-match", "digits"))
    yield TaskSpec(name="sort", description="sort the digits: 3142> -> 1234", factory=_factory("sort"),
                   config_type=DigitTaskConfig, rewards=("partial-match", "digits"))
    yield TaskSpec(name="add", description="add two numbers: 12+7= -> 19", factory=_factory("add"),
                   config_type=DigitTaskConfig, rewards=("exact-match", "digits"))
    yield TaskSpec(name="calculator", description="arithmetic with a calculator tool: 37*49= -> 1813 (agentic demo)",
                   factory=lambda options: CalculatorTask(options), config_type=CalculatorTaskConfig,
                   rewards=("exact-match", "prefix-match", "tool-call-match"))
    yield TaskSpec(name="jsonl", description="a JSONL dataset of {prompt, answer} objects, held-out split by hash",
                   factory=JsonlTask, config_type=JsonlTaskConfig, rewards=("math-answer",))
