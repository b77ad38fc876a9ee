"""The ``arithmetic`` task (levels, held-out split, few-shot chat prompts), the
``answer-exact`` / ``answer-format`` rewards, chat-message prompts through a
real chat template, and ``rlpipe eval``'s format metric."""

from __future__ import annotations

import itertools
import json
import re
import types

import numpy as np
import pytest

from rlpipe.app.defaults import DEFAULT_CONFIG
from rlpipe.app.evaluation import evaluate
from rlpipe.core.config import ConfigValueError, merge
from rlpipe.core.errors import DatasetError
from rlpipe.core.hookspecs import hookimpl
from rlpipe.core.plugins import load_registry
from rlpipe.core.specs import RolloutEngineSpec, TaskSpec
from rlpipe.models.generation import Generation
from rlpipe.models.prompts import encode_prompt, prompt_items, prompt_messages
from rlpipe.models.tokenizer import CharTokenizer, HFTokenizer
from rlpipe.plugins.rewards import answer_exact, answer_format, hash_answer
from rlpipe.plugins.tasks import (
    ARITHMETIC_FORMAT_WEIGHT,
    DEFAULT_INSTRUCTION,
    ArithmeticTask,
    ArithmeticTaskConfig,
    held_out,
)
from rlpipe.runtime.run_config import build_config
from rlpipe.testing import register_plugin

LEVELS = {"add1": (range(10), range(10), "+"), "add2": (range(10, 100), range(10, 100), "+"),
          "mul2x1": (range(10, 100), range(2, 10), "*")}


def config(registry, data):
    """A run config: the embedded default without its task's options, then ``data``."""
    return build_config(merge(merge(DEFAULT_CONFIG, {"task": {"options": None}}), data), registry)


def epoch(task, split, seed=0):
    """One epoch of ``split``: every problem once."""
    return list(itertools.islice(task.examples(seed=seed, split=split), task.size(split)))


# -- the task ------------------------------------------------------------------------------


def test_is_registered_with_exact_then_a_little_format(registry):
    spec = registry.get("rlpipe_tasks", "arithmetic", path="task.name")
    assert spec.rewards == ("answer-exact", "answer-format") and spec.format_reward == "answer-format"
    assert spec.reward_terms == (("answer-exact", 1.0), ("answer-format", ARITHMETIC_FORMAT_WEIGHT))
    assert 0 < ARITHMETIC_FORMAT_WEIGHT < 1 and spec.config_type is ArithmeticTaskConfig
    for name in spec.rewards:
        registry.get("rlpipe_reward_functions", name, path="x")


def test_task_spec_weights_default_to_one_and_must_match_the_rewards():
    assert TaskSpec(name="t", description="d", factory=dict, rewards=("a", "b")).reward_terms == (("a", 1.0), ("b", 1.0))
    with pytest.raises(ValueError, match="2 reward functions"):
        TaskSpec(name="t", description="d", factory=dict, rewards=("a", "b"), reward_weights=(1.0,))


@pytest.mark.parametrize("level", LEVELS)
def test_levels_generate_their_whole_problem_space(level):
    first, second, op = LEVELS[level]
    task = ArithmeticTask(ArithmeticTaskConfig(level=level))
    seen = {}
    for split in ("train", "eval"):
        for ex in epoch(task, split):
            a, o, b = re.fullmatch(r"What is (\d+) (.) (\d+)\?", ex["question"]).groups()
            assert o == op and ex["level"] == level
            assert ex["answer"] == str(int(a) + int(b) if op == "+" else int(a) * int(b))
            seen[(int(a), int(b))] = split
    assert set(seen) == set(itertools.product(first, second))
    assert task.size("train") + task.size("eval") == len(first) * len(second)
    assert len(set(seen.values())) == 2  # both splits non-empty


def test_add1_has_100_problems_and_a_non_empty_held_out_split():
    task = ArithmeticTask()
    assert task.size("train") + task.size("eval") == 100
    assert 10 <= task.size("eval") <= 30  # eval_fraction 0.2, by hash


@pytest.mark.parametrize("level", LEVELS)
def test_held_out_split_is_disjoint_stable_and_by_hash_of_the_question(level):
    c = ArithmeticTaskConfig(level=level)
    one, two = ArithmeticTask(c), ArithmeticTask(c)
    train = {ex["question"] for ex in epoch(one, "train")}
    held = {ex["question"] for ex in epoch(one, "eval", seed=3)}
    assert not train & held
    assert len(train) == one.size("train") and len(held) == one.size("eval")  # an epoch is every problem once
    assert held == {ex["question"] for ex in epoch(two, "eval", seed=7)}  # stable across objects and seeds
    assert all(held_out(q, c.eval_fraction) for q in held) and not any(held_out(q, c.eval_fraction) for q in train)


def test_streams_are_seeded_and_reshuffled_every_epoch():
    task = ArithmeticTask()
    n = task.size("train")
    a = [ex["question"] for ex in itertools.islice(task.examples(seed=1), 2 * n)]
    assert a == [ex["question"] for ex in itertools.islice(task.examples(seed=1), 2 * n)]
    assert a != [ex["question"] for ex in itertools.islice(task.examples(seed=2), 2 * n)]
    assert a[:n] != a[n:] and sorted(a[:n]) == sorted(a[n:])


@pytest.mark.parametrize("level", LEVELS)
def test_shots_come_from_train_never_the_question(level):
    task = ArithmeticTask(ArithmeticTaskConfig(level=level, shots=4))
    train = {ex["question"] for ex in epoch(task, "train")}
    shot_sets = set()
    for split in ("train", "eval"):
        for ex in epoch(task, split):
            m = ex["messages"]
            assert [t["role"] for t in m] == ["user", "assistant"] * 4 + ["user"]
            asked = [t["content"].removeprefix(DEFAULT_INSTRUCTION + "\n") for t in m[0::2]]
            assert all(t["content"].startswith(DEFAULT_INSTRUCTION + "\n") for t in m[0::2])
            assert asked[-1] == ex["question"] and ex["question"] not in asked[:-1]
            assert set(asked[:-1]) <= train and len(set(asked[:-1])) == 4
            for q, t in zip(asked, m[1::2]):  # each shot's answer: the computation, then the answer line
                value = str(eval(q.removeprefix("What is ").removesuffix("?")))
                assert t["content"] == f"{q.removeprefix('What is ').removesuffix('?')} = {value}\n#### {value}"
            shot_sets.add(tuple(asked[:-1]))
    assert len(shot_sets) <= 5  # one fixed set, a neighbour for the questions that are themselves shots


def test_prompt_options_shots_instruction_show_work():
    task = ArithmeticTask(ArithmeticTaskConfig(shots=2, instruction="", show_work=False))
    ex = next(task.examples(seed=0, split="eval"))
    m = ex["messages"]
    assert len(m) == 5 and m[-1]["content"] == ex["question"]
    assert all(re.fullmatch(r"#### \d+", t["content"]) for t in m[1::2])
    # the plain-text prompt holds the same conversation
    assert ex["prompt"].endswith(f"Q: {ex['question']}\nA:") and ex["prompt"].count("Q: ") == 3
    assert ArithmeticTask(ArithmeticTaskConfig(shots=0)).example((3, 4))["messages"] == [
        {"role": "user", "content": f"{DEFAULT_INSTRUCTION}\nWhat is 3 + 4?"}]
    plain = ArithmeticTask(ArithmeticTaskConfig(shots=1)).example((3, 4))["prompt"]
    assert plain.startswith(DEFAULT_INSTRUCTION + "\n\nQ: What is ") and "\n#### " in plain


@pytest.mark.parametrize(("where", "instructed"), [("every", [0, 2, 4]), ("first", [0]), ("system", [])])
def test_instruction_placement(where, instructed):
    m = ArithmeticTask(ArithmeticTaskConfig(shots=2, instruction="Use ####.", instruction_in=where)).example((3, 4))["messages"]
    if where == "system":
        assert m.pop(0) == {"role": "system", "content": "Use ####."}
    assert [t["role"] for t in m] == ["user", "assistant"] * 2 + ["user"] and m[-1]["content"].endswith("What is 3 + 4?")
    assert [i for i, t in enumerate(m) if t["content"].startswith("Use ####.\n")] == instructed


def test_bad_options_are_errors():
    with pytest.raises(ConfigValueError, match="add1, add2, mul2x1"):
        ArithmeticTaskConfig(level="sub")
    with pytest.raises(ConfigValueError):
        ArithmeticTaskConfig(shots=-1)
    with pytest.raises(ConfigValueError, match="every, first, system"):
        ArithmeticTaskConfig(instruction_in="user")
    with pytest.raises(DatasetError, match="training problems"):
        ArithmeticTask(ArithmeticTaskConfig(eval_fraction=0.99))
    no_eval = ArithmeticTask(ArithmeticTaskConfig(eval_fraction=0.0))
    assert no_eval.size("eval") == 0 and no_eval.size("train") == 100
    with pytest.raises(DatasetError, match="eval split has no problems"):
        no_eval.examples(seed=0, split="eval")
    with pytest.raises(ValueError, match="unknown split"):
        no_eval.size("test")


def test_options_come_from_the_run_config(registry):
    cfg = config(registry, {"task": {"name": "arithmetic", "options": {"level": "mul2x1", "shots": 2}}})
    task = registry.get("rlpipe_tasks", "arithmetic", path="task.name").factory(cfg.task.options)
    assert task.config.level == "mul2x1" and task.config.shots == 2


# -- rewards --------------------------------------------------------------------------------


@pytest.mark.parametrize(("completion", "value"), [
    ("#### 12", 12), ("####12", 12), ("#### 1,200", 1200), ("#### -3", -3), ("#### 7.", 7), ("#### +7", 7),
    ("#### 7\r\n", 7), ("Let me think. 3 + 4 is 7, or is it 8?\nSo:\n#### 7\nDone.", 7),
    ("#### 7\n#### 8", 7),                # two answer lines: the first counts
    ("#### abc\n#### 7", None),           # ... even when it is not a number
    ("the answer is 7", None), ("", None), ("####", None), ("####\n7", None), ("#### 12 apples", None),
    ("#### 3.5", None), ("#### 7-", None), ("# 7", None),
])
def test_hash_answer(completion, value):
    assert hash_answer(completion) == value
    assert answer_format("", completion, {"answer": "7"}) == float(value is not None)


@pytest.mark.parametrize(("completion", "answer", "score"), [
    ("#### 12", "12", 1.0), ("####12", "12", 1.0), ("#### 1,200", "1200", 1.0), ("#### -3", "-3", 1.0),
    ("I add them up: 3 + 4 = 7. I am sure.\n#### 7", "7", 1.0), ("#### 7\n#### 8", "8", 0.0),
    ("3 + 4 = 7", "7", 0.0),                      # right number, no answer line
    ("#### 12", "2 * 6 = 12\n#### 12", 1.0),      # a GSM8K-style worked answer
    ("#### 12", 12, 1.0), ("#### 12", "twelve", 0.0), ("#### 012", "12", 1.0),
])
def test_answer_exact(completion, answer, score):
    assert answer_exact("", completion, {"answer": answer}) == score
    if score:
        assert answer_format("", completion, {"answer": answer}) == 1.0  # correct implies the format


@pytest.mark.parametrize("garbage", [None, 12, b"#### 12", "\x00####\x00", "#" * 1000, "####" + "9" * 500])
def test_rewards_are_robust_to_garbage(garbage):
    for fn in (answer_exact, answer_format):
        assert fn("", garbage, {"answer": "12"}) in (0.0, 1.0)
    assert answer_exact("", "#### 12", {}) == 0.0 and answer_exact("", "#### 12", {"answer": None}) == 0.0


# -- prompts as chat conversations -----------------------------------------------------------

# SmolLM2-135M-Instruct's chat template (ChatML with a default system message).
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture
def chatml_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is 3 + 4?\n#### 7 Answer with the final result"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                                "chat_template": SMOLLM2}))
    return tmp_path


def test_messages_are_rendered_through_the_chat_template(chatml_dir):
    tok = HFTokenizer.from_dir(chatml_dir)
    ex = ArithmeticTask(ArithmeticTaskConfig(shots=1, instruction="Be brief.")).example((3, 4))
    shot = ex["messages"][0]["content"].removeprefix("Be brief.\n")
    a, b = re.fullmatch(r"What is (\d) \+ (\d)\?", shot).groups()
    want = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\nBe brief.\n{shot}<|im_end|>\n"
            f"<|im_start|>assistant\n{a} + {b} = {int(a) + int(b)}\n#### {int(a) + int(b)}<|im_end|>\n"
            "<|im_start|>user\nBe brief.\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n")
    ids = encode_prompt(tok, ex)
    assert ids == tok.encode(want) and tok.decode(ids) == want.replace("<|im_start|>", "").replace("<|im_end|>", "")
    # a prompt string, or an example without messages, is one user message
    assert encode_prompt(tok, "hi") == encode_prompt(tok, {"prompt": "hi", "answer": "1"}) == tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert prompt_messages({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]


def test_without_a_chat_template_the_plain_prompt_is_used(chatml_dir):
    (chatml_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = HFTokenizer.from_dir(chatml_dir)
    ex = ArithmeticTask(ArithmeticTaskConfig(shots=2)).example((3, 4))
    assert encode_prompt(tok, ex) == tok.encode(ex["prompt"])


def test_prompt_items_encode_the_messages():
    tok = CharTokenizer()  # its "template" joins the turns' contents with newlines
    task = ArithmeticTask(ArithmeticTaskConfig(shots=1))
    item = next(prompt_items(task, tok, seed=0, prompts_per_item=3, items_per_step=1))[0]
    for row, mask, ex in zip(item["prompt_tokens"], item["prompt_mask"], item["example"]):
        assert tok.decode(row[mask.astype(bool)].tolist()) == "\n".join(m["content"] for m in ex["messages"])


# -- evaluation: format next to accuracy -----------------------------------------------------

SMALL = {"task": {"name": "arithmetic", "options": {"shots": 1, "instruction": "Use ####."}},
         "roles": {"rollout": {"max_new_tokens": 4}}}


def test_evaluate_reports_format_with_the_tiny_model(registry):
    cfg = config(registry, SMALL)
    r = evaluate(cfg, registry, num_examples=4, k=2, num_samples=2, batch_size=8, details=True)
    json.dumps(r, allow_nan=False)
    assert r["format_reward"] == "answer-format" and r["correct_reward"] == "answer-exact"
    for mode in ("greedy", "sampled"):
        assert 0.0 <= r[f"{mode}/accuracy"] <= r[f"{mode}/format"] <= 1.0  # correct implies the format
        assert r[f"{mode}/format"] == r[f"{mode}/reward/answer-format"]
        assert r[f"{mode}/reward_mean"] == pytest.approx(
            r[f"{mode}/reward/answer-exact"] + ARITHMETIC_FORMAT_WEIGHT * r[f"{mode}/reward/answer-format"])
    assert [s["greedy_format"] for s in r["samples"]] == [answer_format("", s["greedy"], {}) for s in r["samples"]]
    held = {ex["question"] for ex in epoch(ArithmeticTask(ArithmeticTaskConfig(shots=1)), "eval")}
    assert all(s["prompt"].rsplit("Q: ", 1)[1].removesuffix("\nA:") in held for s in r["samples"])


class FormatOracle:
    """Answers the question at the end of the prompt.  Greedy: ``#### <sum>``.
    Sampled, per example in order: ``#### <sum>``, ``#### <sum + 1>`` (the
    format, wrong), then ``<sum>`` (right number, no format)."""

    def __init__(self, n: int):
        self.n, self.sampled_rows, self.tok = n, 0, CharTokenizer()

    def generate(self, state, prompt_tokens, prompt_mask, key, params, *, sharding=None):
        rows, width = prompt_tokens.shape[0], params.max_new_tokens
        tokens, mask = np.full((rows, width), params.pad_id, np.int32), np.zeros((rows, width), bool)
        for r in range(rows):
            prompt = self.tok.decode(prompt_tokens[r][prompt_mask[r].astype(bool)].tolist())
            a, b = map(int, re.findall(r"What is (\d+) \+ (\d+)\?", prompt)[-1])
            text = f"#### {a + b}"
            if params.temperature > 0:
                j = self.sampled_rows % self.n
                self.sampled_rows += 1
                text = [f"#### {a + b}", f"#### {a + b + 1}"][j] if j < 2 else str(a + b)
            ids = (self.tok.encode(text) + [self.tok.eos_id])[:width]
            tokens[r, : len(ids)], mask[r, : len(ids)] = ids, True
        return Generation(tokens=tokens, mask=mask, logprobs=np.zeros((rows, width), np.float32))


def test_format_and_accuracy_are_aggregated_exactly():
    n, m = 4, 3
    oracle = FormatOracle(n)
    plugin = types.SimpleNamespace(rlpipe_rollout_engines=hookimpl(lambda: [RolloutEngineSpec(
        name="format-oracle", description="answers arithmetic", factory=lambda graphdef, **kw: oracle)]))
    with register_plugin(plugin, name="format-oracle"):
        reg = load_registry(warn=lambda m: None)
        cfg = config(reg, {**SMALL, "roles": {"rollout": {"engine": "format-oracle", "max_new_tokens": 8}}})
        r = evaluate(cfg, reg, num_examples=m, k=2, num_samples=n, batch_size=8)
        plain = evaluate(config(reg, {"task": {"name": "reverse"}, "roles": {"rollout": {"engine": "format-oracle"}}}),
                         reg, num_examples=0, k=0)
    assert (r["greedy/accuracy"], r["greedy/format"]) == (1.0, 1.0)
    assert r["greedy/reward_mean"] == pytest.approx(1 + ARITHMETIC_FORMAT_WEIGHT)
    assert r["sampled/accuracy"] == pytest.approx(1 / 4) and r["sampled/format"] == pytest.approx(2 / 4)
    assert r["sampled/pass@k"] == pytest.approx(1 - 3 / 6)
    # a task without a format reward: the keys are there, with no value
    assert plain["format_reward"] is None and plain["greedy/format"] is None and plain["sampled/format"] is None
