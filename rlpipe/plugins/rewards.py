"""rlpipe's built-in reward functions, registered through the ``rlpipe`` entry
point ``rewards``.

A reward function is ``fn(prompt: str, completion: str, example: Mapping) ->
float``: the decoded prompt, the decoded completion (special tokens dropped)
and the task's example (``example["answer"]`` for the built-in tasks).  It
runs on the host, in the reward stage, while the devices generate the next
item.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

from rlpipe.core.hookspecs import hookimpl
from rlpipe.core.specs import RewardFunctionSpec


@attrs.frozen(kw_only=True)
class RewardTerm:
    """One reward function (a ``rlpipe_reward_functions`` plugin) and its weight,
    as ``roles.reward.functions`` and environments list them."""

    name: str
    weight: float = 1.0


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def exact_match(prompt: str, completion: str, example: Mapping) -> float:
    """1.0 when the completion, stripped, equals the answer; else 0.0."""
    return float(completion.strip() == str(example["answer"]).strip())


def partial_match(prompt: str, completion: str, example: Mapping) -> float:
    """Partial credit: the share of the answer's characters that the completion
    has at the same position, minus the share of extra characters; in [0, 1]."""
    answer, got = str(example["answer"]).strip(), completion.strip()
    if not answer:
        return float(not got)
    hits = sum(a == b for a, b in zip(answer, got))
    extra = max(len(got) - len(answer), 0)
    return max(0.0, (hits - extra) / len(answer))


def prefix_match(prompt: str, completion: str, example: Mapping) -> float:
    """How much of the answer the completion begins with: the length of their
    common prefix over the answer's length, whatever follows; in [0, 1].
    Unlike :func:`partial_match` a character counts only when every one
    before it is right, so credit grows from the left, one character at a time."""
    answer, got = str(example["answer"]).strip(), completion.strip()
    if not answer:
        return 1.0
    n = 0
    for a, b in zip(answer, got):
        if a != b:
            break
        n += 1
    return n / len(answer)


def digits(prompt: str, completion: str, example: Mapping) -> float:
    """Format credit: the share of the completion's characters that are digits;
    0.0 for an empty completion.  A dense signal for the digit tasks, where a
    random policy rarely emits a digit and the match rewards are near 0."""
    got = completion.strip()
    return sum(c.isdigit() for c in got) / len(got) if got else 0.0


def final_number(text: str) -> str | None:
    """The last number in ``text`` (commas dropped, ``3.0`` -> ``3``), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def math_answer(prompt: str, completion: str, example: Mapping) -> float:
    """GSM8K style: 1.0 when the completion's final number equals the answer's
    final number (``#### 42`` or plain ``42``)."""
    want = final_number(str(example["answer"]).split("####")[-1])
    return float(want is not None and final_number(completion) == want)


_HASH_INTEGER = re.compile(r"[+-]?\d+")


def hash_answer(text: str) -> int | None:
    """The integer after the first ``####`` of ``text`` (GSM8K's answer line),
    or None when there is none.

    The rest of that line, with whitespace and commas dropped (``#### 1,200``)
    and one trailing period allowed, must be an optionally signed integer
    and nothing else: ``#### 12``, ``####12``, ``#### -3`` parse;
    ``#### 12 apples``, ``#### 3.5`` and ``####`` followed by a line break
    do not.  Later ``####`` are ignored, so two answer lines count as the
    first one.
    """
    if not isinstance(text, str):
        return None
    at = text.find("####")
    if at < 0:
        return None
    line = text[at + 4:].split("\n", 1)[0]
    value = "".join(line.split()).replace(",", "").replace("\u2212", "-").removesuffix(".")
    if not _HASH_INTEGER.fullmatch(value):
        return None
    return int(value)


def _expected_integer(answer: object) -> int | None:
    """The example's answer as an integer: its ``####`` line when it has one
    (a GSM8K-style worked answer), else the whole answer."""
    text = str(answer)
    return hash_answer(text if "####" in text else "####" + text.strip())


def answer_exact(prompt: str, completion: str, example: Mapping) -> float:
    """1.0 when the integer after the completion's first ``####``
    (:func:`hash_answer`) equals the example's answer; else 0.0 (no
    ``####``, no integer after it, or an answer that is no integer)."""
    got = hash_answer(completion)
    return float(got is not None and got == _expected_integer(example.get("answer") if isinstance(example, Mapping) else None))


def answer_format(prompt: str, completion: str, example: Mapping) -> float:
    """Format credit: 1.0 when the completion's first ``####`` is followed by
    an integer on its line (:func:`hash_answer`), right or wrong; else 0.0.
    Every completion :func:`answer_exact` scores 1 also scores 1 here."""
    return float(hash_answer(completion) is not None)


def tool_call_match(prompt: str, completion: str, example: Mapping) -> float:
    """Tool-use credit, for tasks whose examples give a reference
    ``tool_call``: half for making a call in the first turn (any call, even
    one that fails), half for how much of the reference call — as the tool
    environment's parser writes it, ``example["episode"]["expected_call"]`` —
    the first turn begins with (:func:`prefix_match`); in [0, 1].  0.0 when
    there is no reference (outside the tool environment, or a task without
    reference calls)."""
    episode = example.get("episode") if isinstance(example, Mapping) else None
    if not isinstance(episode, Mapping) or not episode.get("expected_call") or not episode.get("actions"):
        return 0.0
    called = bool(episode.get("tool_calls")) and len(episode["actions"]) > 1
    return 0.5 * called + 0.5 * prefix_match(prompt, str(episode["actions"][0]), {"answer": episode["expected_call"]})


@hookimpl
def rlpipe_reward_functions():
    yield RewardFunctionSpec(name="exact-match", description="1 if the completion equals the answer", fn=exact_match)
    yield RewardFunctionSpec(name="partial-match", description="share of answer characters in place (partial credit)", fn=partial_match)
    yield RewardFunctionSpec(name="prefix-match", description="share of the answer the completion begins with",
                             fn=prefix_match)
    yield RewardFunctionSpec(name="digits", description="share of completion characters that are digits (format)", fn=digits)
    yield RewardFunctionSpec(name="math-answer", description="final-number match, GSM8K style", fn=math_answer)
    yield RewardFunctionSpec(name="answer-exact", description="1 if the integer after the first #### is the answer",
                             fn=answer_exact)
    yield RewardFunctionSpec(name="answer-format", description="1 if the first #### is followed by an integer (format)",
                             fn=answer_format)
    yield RewardFunctionSpec(name="tool-call-match", description="first turn vs the example's reference tool call (partial credit)",
                             fn=tool_call_match)
