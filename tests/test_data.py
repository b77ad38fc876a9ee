"""Datasets and prompts: the ``jsonl`` task (parsing, errors with file:line, the
held-out split, shuffling) and :func:`rlpipe.models.prompts.prompt_items` (resume by
``start_step``, prompt-length limits and their counters)."""

from __future__ import annotations

import itertools
import json

import attrs
import numpy as np
import pytest
from helpers import EXAMPLES

from rlpipe.app.defaults import DEFAULT_CONFIG
from rlpipe.core.errors import ConfigError, DatasetError, UsageError
from rlpipe.models.prompts import (
    PromptCounters,
    encode_prompt,
    fit_prompt,
    prompt_items,
)
from rlpipe.models.tokenizer import CharTokenizer
from rlpipe.plugins.tasks import DigitTask, DigitTaskConfig, JsonlTaskConfig, held_out
from rlpipe.runtime.run_config import load_config


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def arith(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1), "id": i} for i in range(start, start + n)]


def jsonl_task(registry, **options):
    """The task as ``rlpipe train`` builds it: options structured by the plugin's
    config type, then its factory."""
    spec = registry.get("rlpipe_tasks", "jsonl", path="task.name")
    return spec.factory(spec.config_type(**options))


def take(task, n, *, seed=0, split="train"):
    return list(itertools.islice(task.examples(seed=seed, split=split), n))


# -- the jsonl task ---------------------------------------------------------------------


def test_jsonl_task_is_registered_with_the_math_answer_reward(registry):
    spec = registry.get("rlpipe_tasks", "jsonl", path="task.name")
    assert spec.rewards == ("math-answer",) and spec.config_type is JsonlTaskConfig


def test_lines_become_examples_with_their_metadata(registry, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "What is 2 + 2?", "answer": "4", "level": 1},
        "",  # blank lines are skipped
        {"prompt": "Half of 7?", "answer": 3.5, "tags": ["div"]},  # a number answer becomes its text
    ])
    task = jsonl_task(registry, path=path, eval_fraction=0.0, shuffle=False)
    assert task.size("train") == 2 and task.size("eval") == 0
    assert take(task, 3) == [
        {"prompt": "What is 2 + 2?", "answer": "4", "level": 1},
        {"prompt": "Half of 7?", "answer": "3.5", "tags": ["div"]},
        {"prompt": "What is 2 + 2?", "answer": "4", "level": 1},  # repeats over epochs
    ]


def test_field_names_are_configurable(registry, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "solution": "#### 12", "source": "gsm"}])
    [ex] = take(jsonl_task(registry, path=path, prompt_field="question", answer_field="solution", eval_fraction=0.0), 1)
    assert ex == {"prompt": "Q?", "answer": "#### 12", "source": "gsm"}


def test_malformed_lines_are_all_reported_with_file_and_line(registry, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "answer": "1"},
        '{"prompt": "no closing brace", "answer": "1"',
        {"prompt": "no answer"},
        {"prompt": ["not", "a string"], "answer": "1"},
        {"prompt": "ok", "answer": True},
        "[1, 2]",
        {"prompt": "", "answer": "1"},
    ])
    with pytest.raises(DatasetError) as info:
        jsonl_task(registry, path=path)
    lines = info.value.lines()
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2  # the CLI: one line each, exit 2
    assert lines[0].startswith(f"{path}:2: invalid JSON: ")
    assert lines[1:] == [
        f"{path}:3: missing answer field 'answer' (keys: 'prompt')",
        f"{path}:4: prompt field 'prompt' must be a string, got a list",
        f"{path}:5: answer field 'answer' must be a string or a number, got a boolean",
        f"{path}:6: expected a JSON object, got a list",
        f"{path}:7: prompt field 'prompt' is empty",
    ]


def test_a_bad_line_in_the_eval_file_is_reported_when_the_task_is_built(registry, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", arith(3))
    held = write_jsonl(tmp_path / "eval.jsonl", [*arith(2), {"prompt": "x"}])
    with pytest.raises(DatasetError, match=rf"^{held}:3: missing answer field 'answer'"):
        jsonl_task(registry, path=train, eval_path=held)


def test_many_bad_lines_are_summarised(registry, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["nope"] * 30)
    with pytest.raises(DatasetError) as info:
        jsonl_task(registry, path=path)
    assert len(info.value.lines()) == 21 and info.value.lines()[-1] == f"{path}: ... and 10 more bad line(s)"


def test_a_missing_file_names_its_path(registry, tmp_path):
    with pytest.raises(DatasetError, match=rf"^{tmp_path / 'nope.jsonl'}: dataset file not found"):
        jsonl_task(registry, path=str(tmp_path / "nope.jsonl"))


def test_a_file_with_no_training_examples_is_an_error(registry, tmp_path):
    with pytest.raises(DatasetError, match="no training examples: it has no examples"):
        jsonl_task(registry, path=write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_an_empty_eval_split_is_an_error_when_asked_for(registry, tmp_path):
    task = jsonl_task(registry, path=write_jsonl(tmp_path / "d.jsonl", arith(5)), eval_fraction=0.0)
    with pytest.raises(DatasetError, match="the eval split has no examples"):
        task.examples(seed=0, split="eval")


def test_held_out_split_is_disjoint_and_stable_when_lines_are_appended(registry, tmp_path):
    rows = arith(200)
    task = jsonl_task(registry, path=write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.25)
    train = {ex["prompt"] for ex in task.splits["train"]}
    held = {ex["prompt"] for ex in task.splits["eval"]}
    assert not train & held and train | held == {r["prompt"] for r in rows}
    assert 20 < len(held) < 80  # about a quarter
    # Appending (and reordering) lines never moves an old line to the other side.
    grown = jsonl_task(registry, path=write_jsonl(tmp_path / "d.jsonl", arith(100, start=200) + rows[::-1]),
                       eval_fraction=0.25)
    assert held <= {ex["prompt"] for ex in grown.splits["eval"]}
    assert train <= {ex["prompt"] for ex in grown.splits["train"]}
    # The eval split comes in file order and is not shuffled.
    assert [ex["prompt"] for ex in take(task, task.size("eval"), split="eval", seed=5)] == \
        [r["prompt"] for r in rows if r["prompt"] in held]


def test_eval_path_is_the_held_out_split(registry, tmp_path):
    task = jsonl_task(registry, path=write_jsonl(tmp_path / "t.jsonl", arith(10)),
                      eval_path=write_jsonl(tmp_path / "e.jsonl", arith(3, start=50)))
    assert task.size("train") == 10  # eval_fraction does not apply
    assert [ex["id"] for ex in take(task, 3, split="eval")] == [50, 51, 52]


def test_shuffle_is_per_epoch_and_deterministic_under_the_seed(registry, tmp_path):
    task = jsonl_task(registry, path=write_jsonl(tmp_path / "d.jsonl", arith(20)), eval_fraction=0.0)
    ids = [ex["id"] for ex in take(task, 60, seed=3)]
    epochs = [ids[:20], ids[20:40], ids[40:]]
    assert all(sorted(e) == list(range(20)) for e in epochs)  # each epoch is every example once
    assert epochs[0] != epochs[1] and epochs[0] != list(range(20))  # reshuffled every epoch
    assert [ex["id"] for ex in take(task, 60, seed=3)] == ids  # the same seed, the same order
    assert [ex["id"] for ex in take(task, 20, seed=4)] != ids[:20]
    ordered = jsonl_task(registry, path=str(tmp_path / "d.jsonl"), eval_fraction=0.0, shuffle=False)
    assert [ex["id"] for ex in take(ordered, 40)] == list(range(20)) * 2


def test_examples_are_fresh_dicts(registry, tmp_path):
    task = jsonl_task(registry, path=write_jsonl(tmp_path / "d.jsonl", arith(1)), eval_fraction=0.0)
    first, second = take(task, 2)
    first["answer"] = "changed"
    assert second["answer"] == "1"


def test_the_example_config_builds_its_dataset(registry):
    cfg = load_config(registry, defaults=DEFAULT_CONFIG, files=[EXAMPLES / "jsonl_math.yaml"])
    assert cfg.task.name == "jsonl" and cfg.task.max_prompt_tokens == 128
    spec = registry.get("rlpipe_tasks", "jsonl", path="task.name")
    task = spec.factory(attrs.evolve(cfg.task.options, path=str(EXAMPLES.parent / cfg.task.options.path)))
    assert task.size("train") >= 30 and task.size("eval") >= 5
    assert all(ex["answer"].split("####")[-1].strip().lstrip("-").isdigit() for ex in task.splits["train"])


# -- config ---------------------------------------------------------------------------------


def test_selecting_another_task_drops_the_previous_tasks_options(registry, tmp_path):
    # The defaults carry digit-task options; selecting jsonl starts its options afresh,
    # by --set or by a file.
    cfg = load_config(registry, defaults=DEFAULT_CONFIG, overrides=["task.name=jsonl", "task.options.path=d.jsonl"])
    assert cfg.task.options == JsonlTaskConfig(path="d.jsonl")
    cfg = load_config(registry, defaults=DEFAULT_CONFIG,
                      files=[write_jsonl(tmp_path / "c.yaml", ["task: {name: jsonl, options: {path: d.jsonl}}"])])
    assert cfg.task.options == JsonlTaskConfig(path="d.jsonl")
    # Options given for the same task still merge key by key.
    cfg = load_config(registry, defaults=DEFAULT_CONFIG, overrides=["task.options.max_digits=4"])
    assert cfg.task.options == DigitTaskConfig(min_digits=2, max_digits=4)


@pytest.mark.parametrize(("override", "message"), [
    ("task.max_prompt_tokens=0", "task.max_prompt_tokens: must be at least 1 (or null: no limit), got 0"),
    ("task.overlong_prompts=drop", "task.overlong_prompts: must be 'truncate' or 'reject', got 'drop'"),
    ("task.options.path=x", "task.options.path: unknown key"),
])
def test_prompt_limit_keys_are_checked(registry, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(registry, defaults=DEFAULT_CONFIG, overrides=[override])
    assert any(line.startswith(message) for line in info.value.lines())


def test_jsonl_requires_a_path(registry):
    with pytest.raises(ConfigError) as info:
        load_config(registry, defaults=DEFAULT_CONFIG, overrides=["task.name=jsonl"])
    assert info.value.lines() == ["task.options.path: required key missing"]


# -- prompt_items -----------------------------------------------------------------------------


class CountingTokenizer(CharTokenizer):
    """The char tokenizer, counting the prompts it encodes."""

    def __init__(self):
        super().__init__()
        self.encoded = 0

    def encode(self, text):
        self.encoded += 1
        return super().encode(text)


def reverse_task():
    return DigitTask("reverse", DigitTaskConfig(min_digits=1, max_digits=8))


def batches(task, n, tokenizer=None, **kw):
    kw = {"seed": 7, "prompts_per_item": 3, "items_per_step": 2, **kw}
    return list(itertools.islice(prompt_items(task, tokenizer or CharTokenizer(), **kw), n))


def same(a, b):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        for x, y in zip(step_a, step_b, strict=True):
            assert sorted(x) == sorted(y)
            for field in x:
                if field == "example":
                    assert list(x[field]) == list(y[field])
                else:
                    np.testing.assert_array_equal(x[field], y[field])


def test_items_hold_padded_prompts_with_their_examples():
    [[item, _]] = batches(reverse_task(), 1)
    tok = CharTokenizer()
    for row, mask, ex in zip(item["prompt_tokens"], item["prompt_mask"], item["example"]):
        assert row[mask.astype(bool)].tolist() == encode_prompt(tok, ex["prompt"])
        assert (row[~mask.astype(bool)] == tok.pad_id).all()
    assert item["example_id"].tolist() == item["group_id"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("limits", [{}, {"max_prompt_tokens": 5, "overlong": "truncate"},
                                    {"max_prompt_tokens": 5, "overlong": "reject"}])
def test_start_step_equals_the_tail_of_the_stream_from_zero(limits):
    whole = batches(reverse_task(), 6, **limits)
    same(batches(reverse_task(), 2, start_step=4, **limits), whole[4:])
    assert batches(reverse_task(), 1, start_step=4, **limits)[0][0]["example_id"].tolist() == [24, 25, 26]


@pytest.mark.parametrize("overlong", ["truncate", "reject"])
def test_start_step_does_not_tokenize_skipped_examples_unless_rejecting(overlong):
    tok = CountingTokenizer()
    batches(reverse_task(), 1, tok, start_step=100, max_prompt_tokens=5, overlong=overlong)
    if overlong == "truncate":
        assert tok.encoded == 6  # only the one batch produced
    else:
        assert tok.encoded > 600  # whether a skipped example was rejected depends on its length


def test_start_step_works_on_a_jsonl_dataset_across_epochs(registry, tmp_path):
    task = jsonl_task(registry, path=write_jsonl(tmp_path / "d.jsonl", arith(7)), eval_fraction=0.0)
    same(batches(task, 2, start_step=3), batches(task, 5)[3:])


def test_truncate_keeps_the_end_of_long_prompts_and_counts_them():
    counters = PromptCounters()
    out = batches(reverse_task(), 4, max_prompt_tokens=5, overlong="truncate", counters=counters)
    long = 0
    for step in out:
        for item in step:
            for row, mask, ex in zip(item["prompt_tokens"], item["prompt_mask"], item["example"]):
                full = CharTokenizer().encode(ex["prompt"])
                assert row[mask.astype(bool)].tolist() == full[-5:]  # the last tokens: the end of the prompt
                long += len(full) > 5
    assert long > 0
    assert (counters.prompts, counters.truncated, counters.rejected) == (24, long, 0)
    assert counters.metrics() == {"data/prompts": 24, "data/prompts_truncated": long, "data/prompts_rejected": 0}


def test_reject_skips_long_prompts_draws_the_next_and_counts_them():
    counters = PromptCounters()
    out = batches(reverse_task(), 4, max_prompt_tokens=5, overlong="reject", counters=counters)
    kept = [ex["prompt"] for step in out for item in step for ex in item["example"]]
    assert len(kept) == 24 and all(len(p) <= 5 for p in kept)  # batches stay full
    # The same stream without a limit: the kept prompts in order, with the long ones in between.
    stream = itertools.islice(reverse_task().examples(seed=7), 24 + counters.rejected)
    drawn = [ex["prompt"] for ex in stream]
    assert [p for p in drawn if len(p) <= 5] == kept
    assert counters.rejected == sum(len(p) > 5 for p in drawn) > 0
    assert (counters.prompts, counters.truncated) == (24, 0)


def test_reject_when_nothing_fits_is_an_error_not_a_hang(registry, tmp_path):
    task = jsonl_task(registry, path=write_jsonl(tmp_path / "d.jsonl", arith(5)), eval_fraction=0.0)
    with pytest.raises(DatasetError, match=r"10 prompts in a row are longer than max_prompt_tokens=3 tokens"):
        batches(task, 1, max_prompt_tokens=3, overlong="reject")


def test_fit_prompt():
    assert fit_prompt([1, 2, 3], None) == [1, 2, 3]
    assert fit_prompt([1, 2, 3], 3, "reject") == [1, 2, 3]
    assert fit_prompt([1, 2, 3], 2, "truncate") == [2, 3]
    assert fit_prompt([1, 2, 3], 2, "reject") is None
    with pytest.raises(ValueError, match="overlong"):
        fit_prompt([1], 2, "drop")


def test_held_out_is_a_function_of_the_text_only():
    assert held_out("What is 1 + 2?", 0.5) == held_out("What is 1 + 2?", 0.5)
    assert not held_out("anything", 0.0)
    shares = np.mean([held_out(f"prompt {i}", 0.3) for i in range(2000)])
    assert 0.25 < shares < 0.35
