"""The ``calculator`` task's chat form for pretrained models: shots, wording, formats."""

import itertools

import pytest

from rlpipe.plugins.tasks import CalculatorTask, CalculatorTaskConfig
from rlpipe.plugins.tools import Gsm8kFormat, HermesFormat, TagFormat, calculate



def take(task, n, split="train", seed=0):
    return list(itertools.islice(task.examples(seed=seed, split=split), n))


def test_defaults_keep_the_bare_prompt_for_the_character_model():
    for ex in take(CalculatorTask(), 20):
        assert "messages" not in ex
        assert ex["prompt"].endswith("=") and ex["prompt"][:-1] == ex["tool_call"]["arguments"]["expression"]


@pytest.mark.parametrize("parser,fmt", [("gsm8k", Gsm8kFormat), ("tag", TagFormat), ("hermes", HermesFormat)])
def test_a_shot_is_a_whole_episode_in_the_parsers_format(parser, fmt):
    task = CalculatorTask(CalculatorTaskConfig(shots=2, parser=parser, operators="+-*"))
    for ex in take(task, 10):
        messages = ex["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
        assert messages[-1]["content"] == f"What is {ex['tool_call']['arguments']['expression']}?"
        for answer in messages[1:-1:2]:
            call = fmt().parse(answer["content"])
            assert call is not None and call.error is None
            expression = call.arguments if isinstance(call.arguments, str) else call.arguments["expression"]
            result = calculate(expression)
            # what follows the call: the calculator's result in the format, then the bare answer
            assert answer["content"][call.end:] == fmt().format_result(result) + result


def test_the_question_is_never_one_of_its_shots_and_shots_are_fixed():
    task = CalculatorTask(CalculatorTaskConfig(digits=1, shots=3, eval_fraction=0.2))
    shots_seen = set()
    for ex in take(task, 200):
        shot_questions = [m["content"] for m in ex["messages"][:-1] if m["role"] == "user"]
        assert ex["messages"][-1]["content"] not in shot_questions
        assert len(shot_questions) == 3
        shots_seen.update(shot_questions)
    assert len(shots_seen) <= 4  # the fixed pool of shots + 1


def test_words_make_the_policy_write_the_expression():
    task = CalculatorTask(CalculatorTaskConfig(shots=1, words=True, operators="+-*"))
    for ex in take(task, 30):
        a, b = ex["tool_call"]["arguments"]["expression"], ex["messages"][-1]["content"]
        assert not set("+-*") & set(b)
        word = {"+": "plus", "-": "minus", "*": "times"}[next(c for c in a if c in "+-*")]
        assert f" {word} " in b
        assert ex["messages"][1]["content"].startswith("<<")  # the shot still shows the symbolic call


def test_an_instruction_alone_makes_chat_turns():
    task = CalculatorTask(CalculatorTaskConfig(instruction="Use the calculator."))
    ex = take(task, 1)[0]
    assert ex["messages"] == [{"role": "user", "content": f"Use the calculator.\nWhat is {ex['tool_call']['arguments']['expression']}?"}]


def test_splits_stay_disjoint_with_shots():
    task = CalculatorTask(CalculatorTaskConfig(digits=1, shots=2, eval_fraction=0.3))
    train = {ex["prompt"] for ex in take(task, 300)}
    held = {ex["prompt"] for ex in take(task, 100, split="eval")}
    assert train and held and not train & held
    shot_prompts = {m["content"] for ex in take(task, 50) for m in ex["messages"][:-1] if m["role"] == "user"}
    assert not {f"What is {p[:-1]}?" for p in held} & shot_prompts


def test_unknown_parser_is_a_config_error():
    with pytest.raises(ValueError, match="tag, gsm8k, hermes"):
        CalculatorTaskConfig(parser="json")
