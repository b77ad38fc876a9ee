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

* ``arithmetic``: ``What is 3 + 4?`` -> ``7``, for pretrained chat models:
  a few-shot chat prompt (``messages``) asking for a final ``#### N`` line,
  scored with ``answer-exact`` plus a little ``answer-format``; levels
  ``add1``, ``add2``, ``mul2x1`` (:class:`ArithmeticTask`).

* ``jsonl``: a dataset of JSON objects, one a line (``{"prompt": ...,
  "answer": ...}`` plus any metadata), scored with ``math-answer`` by default.
  The whole file is checked when the task is built (:class:`JsonlTask`),
  and before that by ``rlpipe config validate`` and ``rlpipe plan``
  (:meth:`JsonlTaskConfig.run_problems`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from rlpipe.core.config import check
from rlpipe.core.errors import DatasetError, Problem
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
        shots: worked episodes before the question, as earlier chat turns,
            for a pretrained chat model (0: the bare prompt ``37*49=``, for
            the character-level tiny model).  Each shot's answer is the whole
            episode: the call, the calculator's result and the final answer,
            written in ``parser``'s format (``What is 12*7?`` ->
            ``<<12*7=84>>84`` with ``gsm8k``).
        parser: the tool-call format of the shots; the environment's
            ``parser`` must be the same (the policy copies what it is shown).
        instruction: a line before the first question; ``""`` for none.
            With ``shots`` or an instruction the examples are chat turns
            (``messages``: ``What is 37*49?``); with neither, the bare
            prompt ``37*49=``.
        shot_seed: the seed choosing the shots (fixed, so a question's
            prompt never changes).
        words: the chat questions name the operator in words (``What is 37
            times 49?``), so the policy has to write the expression itself;
            ``false``: ``What is 37*49?``.
    """

    digits: int = attrs.field(default=2, validator=check(lambda v: 1 <= v <= 9, "must be in [1, 9], got {value}"))
    operators: str = attrs.field(default="*", validator=check(lambda v: v and set(v) <= set("+-*"),
                                                              "must be a non-empty string of + - *, got {value}"))
    eval_fraction: float = attrs.field(default=0.1, validator=check(lambda v: 0 <= v < 1, "must be in [0, 1), got {value}"))
    shots: int = attrs.field(default=0, validator=check(lambda v: 0 <= v <= 16, "must be in [0, 16], got {value}"))
    parser: str = attrs.field(default="gsm8k", validator=check(lambda v: v in CALCULATOR_SHOT_FORMATS,
                                                               "must be one of tag, gsm8k, hermes, got {value}"))
    instruction: str = ""
    shot_seed: int = 0
    words: bool = False


#: The operators of the ``calculator`` task in words (``task.options.words``).
OPERATOR_WORDS = {"+": "plus", "-": "minus", "*": "times"}

#: ``task.options.parser`` of the ``calculator`` task: the built-in tool-call formats.
CALCULATOR_SHOT_FORMATS = ("tag", "gsm8k", "hermes")


class CalculatorTask:
    """``37*49=`` -> ``1813``: arithmetic a small model cannot do in its head.

    Each example also holds ``tool_call``, the reference call
    (``{"name": "calculator", "arguments": {"expression": "37*49"}}``), which
    the ``tool`` environment writes in its format for ``tool-call-match``.
    """

    def __init__(self, config: CalculatorTaskConfig | None = None):
        self.config = config or CalculatorTaskConfig()
        self._shots: list[dict[str, Any]] = []
        if self.config.shots:
            # A fixed pool from the train split, one more than needed: a question
            # that is itself a shot is replaced by the next.
            pool = self._draw(np.random.default_rng(self.config.shot_seed), "train")
            self._shots = [next(pool) for _ in range(self.config.shots + 1)]

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

    def _draw(self, rng: np.random.Generator, split: str) -> Iterator[dict[str, Any]]:
        want_eval = split == "eval"
        while True:
            ex = self._make(rng)
            if held_out(ex["prompt"], self.config.eval_fraction) == want_eval:
                yield ex

    def _episode(self, ex: Mapping[str, Any]) -> str:
        """A shot's assistant turn: the call, the result and the answer, in ``parser``'s format."""
        from rlpipe.plugins.tools import Gsm8kFormat, HermesFormat, TagFormat  # the built-in formats

        fmt = {"tag": TagFormat, "gsm8k": Gsm8kFormat, "hermes": HermesFormat}[self.config.parser]()
        call = ex["tool_call"]
        return fmt.format_call(call["name"], call["arguments"]) + fmt.format_result(ex["answer"]) + ex["answer"]

    def _with_shots(self, ex: dict[str, Any]) -> dict[str, Any]:
        """``ex`` with ``messages``: the instruction, the shots and the question as chat turns."""
        def ask(e: Mapping[str, Any]) -> str:
            expression = e["tool_call"]["arguments"]["expression"]
            if self.config.words:
                for op, word in OPERATOR_WORDS.items():
                    expression = expression.replace(op, f" {word} ")
            return f"What is {expression}?"

        shots = [s for s in self._shots if s["prompt"] != ex["prompt"]][: self.config.shots]
        messages: list[dict[str, str]] = []
        instruction = self.config.instruction.strip()
        for i, shot in enumerate(shots):
            question = f"{instruction}\n{ask(shot)}" if instruction and i == 0 else ask(shot)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": self._episode(shot)}]
        question = f"{instruction}\n{ask(ex)}" if instruction and not shots else ask(ex)
        messages.append({"role": "user", "content": question})
        return {**ex, "messages": messages}

    def examples(self, *, seed: int, split: str = "train") -> Iterator[dict[str, Any]]:
        """An endless, seeded stream of examples of ``split`` (``train`` or ``eval``)."""
        for ex in self._draw(np.random.default_rng(seed), split):
            yield self._with_shots(ex) if self.config.shots or self.config.instruction.strip() else ex


# -- arithmetic with an answer format, for pretrained chat models ---------------------

#: ``task.options.level`` of the ``arithmetic`` task: ``(operator, first
#: operands, second operands)``; the problem space is every pair.
ARITHMETIC_LEVELS: dict[str, tuple[str, range, range]] = {
    "add1": ("+", range(10), range(10)),            # 100 problems
    "add2": ("+", range(10, 100), range(10, 100)),  # 8,100 problems
    "mul2x1": ("*", range(10, 100), range(2, 10)),  # 720 problems (no trivial * 0, * 1)
}

#: The weight of ``answer-format`` among the task's default rewards: enough to
#: pull a model towards the format, small next to a correct answer's 1.0.
ARITHMETIC_FORMAT_WEIGHT = 0.1

#: ``task.options.instruction_in`` of the ``arithmetic`` task.
INSTRUCTION_PLACES = ("every", "first", "system")

DEFAULT_INSTRUCTION = "Answer with the final result on its own line as '#### N'."


@attrs.frozen(kw_only=True)
class ArithmeticTaskConfig:
    """``task.options`` of the ``arithmetic`` task.

    Attributes:
        level: the problems: ``add1`` (``a + b``, one digit each), ``add2``
            (two digits each), ``mul2x1`` (two digits times one).
        shots: worked examples before the question, as earlier chat turns
            (drawn from the train split, never the question itself).
        instruction: a line of instructions; ``""`` for none.
        instruction_in: where it goes: ``every`` user turn (each shot's and
            the question's, so the question reads exactly like the shots),
            the ``first`` user turn only (fewer tokens), or a ``system``
            message (which replaces a template's default system message).
        show_work: the shots' answers show the computation first
            (``3 + 4 = 7`` then ``#### 7`` on the next line); ``false``: the
            answer line alone (``#### 7``).
        eval_fraction: share of the problems held out for evaluation (by a
            stable hash of the question).
        shot_seed: the seed choosing the shots (fixed, so a question's
            prompt never changes).
    """

    level: str = attrs.field(default="add1", validator=check(lambda v: v in ARITHMETIC_LEVELS,
                                                             "must be one of " + ", ".join(ARITHMETIC_LEVELS) + ", got {value}"))
    shots: int = attrs.field(default=4, validator=check(lambda v: 0 <= v <= 16, "must be in [0, 16], got {value}"))
    instruction: str = DEFAULT_INSTRUCTION
    instruction_in: str = attrs.field(default="every", validator=check(lambda v: v in INSTRUCTION_PLACES,
                                                                       "must be one of every, first, system, got {value}"))
    show_work: bool = True
    eval_fraction: float = attrs.field(default=0.2, validator=check(lambda v: 0 <= v < 1, "must be in [0, 1), got {value}"))
    shot_seed: int = 0


class ArithmeticTask:
    """Arithmetic questions whose answer must end in a ``#### N`` line, as a
    few-shot chat prompt.

    The whole problem space of the level is enumerated (100 problems for
    ``add1``, 8,100 for ``add2``, 720 for ``mul2x1``: ``10..99 * 2..9``) and
    split by a stable hash of the question, so the splits are fixed,
    disjoint and their sizes known (:meth:`size`).  Each example is::

        {"prompt": <the conversation as plain text>, "messages": [<chat turns>],
         "answer": "7", "question": "What is 3 + 4?", "level": "add1"}

    ``messages`` holds ``shots`` worked examples as user/assistant turns, then
    the question as the last user turn; :func:`rlpipe.models.prompts.encode_prompt`
    renders it through the tokenizer's chat template, and a tokenizer without
    one reads ``prompt``.  The shots are the first ``shots`` problems of a
    fixed permutation (``shot_seed``) of the train split, skipping the
    question itself.

    Raises:
        DatasetError: ``eval_fraction`` leaves fewer than ``shots + 1``
            training problems.
    """

    def __init__(self, config: ArithmeticTaskConfig | None = None):
        self.config = c = config or ArithmeticTaskConfig()
        op, first, second = ARITHMETIC_LEVELS[c.level]
        problems = [(a, b) for a in first for b in second]
        self.operator = op
        self.splits: dict[str, list[tuple[int, int]]] = {"train": [], "eval": []}
        for p in problems:
            self.splits["eval" if held_out(self.question(p), c.eval_fraction) else "train"].append(p)
        train = self.splits["train"]
        if len(train) < c.shots + 1:
            raise DatasetError(f"task arithmetic (level {c.level}): {len(train)} training problems, but {c.shots} shots "
                               f"and a question need {c.shots + 1}; lower eval_fraction ({c.eval_fraction}) or shots")
        order = np.random.default_rng(c.shot_seed).permutation(len(train))
        # One more than needed: a question that is itself a shot is replaced by the next.
        self._shot_pool = [train[i] for i in order[: c.shots + 1]]

    def question(self, problem: tuple[int, int]) -> str:
        a, b = problem
        return f"What is {a} {self.operator} {b}?"

    def value(self, problem: tuple[int, int]) -> int:
        a, b = problem
        return a + b if self.operator == "+" else a * b

    def _ask(self, problem: tuple[int, int], *, first: bool) -> str:
        instruction = self.config.instruction.strip()
        if instruction and (self.config.instruction_in == "every" or (first and self.config.instruction_in == "first")):
            return f"{instruction}\n{self.question(problem)}"
        return self.question(problem)

    def _solution(self, problem: tuple[int, int]) -> str:
        a, b = problem
        line = f"#### {self.value(problem)}"
        return f"{a} {self.operator} {b} = {self.value(problem)}\n{line}" if self.config.show_work else line

    def shots_for(self, problem: tuple[int, int]) -> list[tuple[int, int]]:
        """The worked examples shown before ``problem`` (never ``problem`` itself)."""
        return [p for p in self._shot_pool if p != problem][: self.config.shots]

    def example(self, problem: tuple[int, int]) -> dict[str, Any]:
        """``problem``'s example: prompt, chat messages and answer."""
        instruction = self.config.instruction.strip()
        messages = [{"role": "system", "content": instruction}] if instruction and self.config.instruction_in == "system" else []
        shots = self.shots_for(problem)
        for i, shot in enumerate(shots):
            messages += [{"role": "user", "content": self._ask(shot, first=i == 0)},
                         {"role": "assistant", "content": self._solution(shot)}]
        messages.append({"role": "user", "content": self._ask(problem, first=not shots)})
        # The same conversation as plain text, for a tokenizer without a chat template.
        turns = [f"Q: {self.question(s)}\nA: {self._solution(s)}" for s in shots]
        text = "\n\n".join([instruction] * bool(instruction) + turns + [f"Q: {self.question(problem)}\nA:"])
        return {"prompt": text, "messages": messages, "answer": str(self.value(problem)),
                "question": self.question(problem), "level": self.config.level}

    def size(self, split: str = "train") -> int:
        """How many distinct problems ``split`` has."""
        return len(self._split(split))

    def _split(self, split: str) -> list[tuple[int, int]]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r} (splits: train, eval)")
        return self.splits[split]

    def examples(self, *, seed: int, split: str = "train") -> Iterator[dict[str, Any]]:
        """An endless stream of ``split``'s problems, each epoch a new
        permutation drawn from ``seed``.

        Raises:
            DatasetError: (at the call) ``split`` is empty.
        """
        problems = self._split(split)
        if not problems:
            raise DatasetError(f"task arithmetic (level {self.config.level}): the {split} split has no problems "
                               f"(eval_fraction={self.config.eval_fraction})")
        return self._stream(problems, seed)

    def _stream(self, problems: list[tuple[int, int]], seed: int) -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        while True:
            for i in rng.permutation(len(problems)):
                yield self.example(problems[i])


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

    def run_problems(self, run_config: Any = None, *, path: str = "task.options") -> list[Problem]:
        """The dataset checked without building anything (``rlpipe config
        validate`` and ``rlpipe plan`` call this): both files exist and every
        line is an example (:func:`scan_jsonl`, streamed), and some examples
        are left for training.  One problem per bad line (at most
        :data:`MAX_REPORTED_PROBLEMS` a file), at ``<path>.path`` or
        ``<path>.eval_path``, each naming ``file:line``."""
        fields = {"prompt_field": self.prompt_field, "answer_field": self.answer_field}
        problems = []
        try:
            counts = scan_jsonl(self.path, **fields, eval_fraction=0.0 if self.eval_path is not None else self.eval_fraction)
        except DatasetError as exc:
            problems.extend(Problem(f"{path}.path", line) for line in exc.lines())
        else:
            if counts.examples == counts.held_out:
                why = ("it has no examples" if not counts.examples
                       else f"every prompt is held out (eval_fraction={self.eval_fraction})")
                problems.append(Problem(f"{path}.path", f"{self.path}: no training examples: {why}"))
        if self.eval_path is not None:
            try:
                scan_jsonl(self.eval_path, **fields)
            except DatasetError as exc:
                problems.extend(Problem(f"{path}.eval_path", line) for line in exc.lines())
        return problems


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _jsonl_lines(path: Path, prompt_field: str, answer_field: str) -> Iterator[tuple[dict[str, Any] | None, list[str]]]:
    """Each non-blank line of ``path`` as ``(example, [])``, or ``(None,
    problems)`` when it is not an example; streamed, one line at a time.

    Raises:
        DatasetError: the file cannot be opened or read.
    """
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise DatasetError(f"{path}: dataset file not found (working directory {Path.cwd()})") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, expected a JSONL file") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read dataset file: {exc.strerror or exc}") from None
    with f:
        offset = 0
        try:
            for number, data in enumerate(f, start=1):
                where = f"{path}:{number}"
                start, offset = offset, offset + len(data)
                try:
                    raw = data.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    yield None, [f"{where}: not UTF-8 text (byte {start + exc.start} of the file)"]
                    continue
                if not raw.strip():
                    continue
                yield _example(raw, where, prompt_field, answer_field)
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read dataset file: {exc.strerror or exc}") from None


def _example(raw: str, where: str, prompt_field: str, answer_field: str) -> tuple[dict[str, Any] | None, list[str]]:
    """One line's example, or its problems (each ``<where>: <reason>``)."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, [f"{where}: invalid JSON: {exc.msg} (column {exc.colno})"]
    if not isinstance(obj, dict):
        return None, [f"{where}: expected a JSON object, got {_kind(obj)}"]
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
        return None, [f"{where}: {b}" for b in bad]
    meta = {k: v for k, v in obj.items() if k not in (prompt_field, answer_field)}
    return {**meta, "prompt": prompt, "answer": answer if isinstance(answer, str) else str(answer)}, []


def _raise_problems(path: Path, problems: list[str]) -> None:
    if problems:
        more = len(problems) - MAX_REPORTED_PROBLEMS
        shown = problems[:MAX_REPORTED_PROBLEMS] + ([f"{path}: ... and {more} more bad line(s)"] if more > 0 else [])
        raise DatasetError("\n".join(shown))


def read_jsonl(path: str | Path, *, prompt_field: str = "prompt", answer_field: str = "answer") -> list[dict[str, Any]]:
    """Every example of a JSONL file, checked whole before anything is used.

    Each non-blank line must be UTF-8 text holding a JSON object whose
    ``prompt_field`` is a non-empty string and whose ``answer_field`` is a
    string or a number (numbers become their decimal text).  An example is
    ``{"prompt", "answer", **metadata}``: the object's other keys are kept as
    they are, except that with other field names a key literally named
    ``prompt`` or ``answer`` is replaced by the canonical one.

    Raises:
        DatasetError: the file cannot be read, or some lines are not examples:
            one line per problem, ``<path>:<line>: <reason>`` (at most
            :data:`MAX_REPORTED_PROBLEMS`, then a count of the rest).
    """
    p = Path(path)
    examples, problems = [], []
    for example, bad in _jsonl_lines(p, prompt_field, answer_field):
        if example is None:
            problems.extend(bad)
        elif not problems:  # once a line is bad the examples are never used
            examples.append(example)
    _raise_problems(p, problems)
    return examples


@attrs.frozen
class JsonlCounts:
    """What :func:`scan_jsonl` found: the examples of a file and how many of
    them a held-out fraction keeps for evaluation."""

    examples: int
    held_out: int


def scan_jsonl(path: str | Path, *, prompt_field: str = "prompt", answer_field: str = "answer",
               eval_fraction: float = 0.0) -> JsonlCounts:
    """Checks a JSONL file as :func:`read_jsonl` does, without keeping its
    examples: the file is streamed line by line, so a large dataset is checked
    in constant memory (what ``rlpipe config validate`` and ``rlpipe plan`` do).

    Raises:
        DatasetError: as :func:`read_jsonl`.
    """
    p = Path(path)
    examples = held = 0
    problems: list[str] = []
    for example, bad in _jsonl_lines(p, prompt_field, answer_field):
        if example is None:
            problems.extend(bad)
        else:
            examples += 1
            held += held_out(example["prompt"], eval_fraction)
    _raise_problems(p, problems)
    return JsonlCounts(examples=examples, held_out=held)


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
    yield TaskSpec(name="arithmetic", description="few-shot chat arithmetic answered as '#### N' (add1, add2, mul2x1)",
                   factory=ArithmeticTask, config_type=ArithmeticTaskConfig, rewards=("answer-exact", "answer-format"),
                   reward_weights=(1.0, ARITHMETIC_FORMAT_WEIGHT), format_reward="answer-format")
    yield TaskSpec(name="jsonl", description="a JSONL dataset of {prompt, answer} objects, held-out split by hash",
                   factory=JsonlTask, config_type=JsonlTaskConfig, rewards=("math-answer",))
