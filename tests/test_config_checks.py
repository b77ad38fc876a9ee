"""What `rlpipe config validate` and `rlpipe plan` check before any model is
built: datasets, the trainer's batch arithmetic, generations per prompt,
sequence length against the model, and a remedy for too few devices.

Nothing here builds a model or compiles a program.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import EXAMPLES, ROOT

from rlpipe.app.defaults import DEFAULT_CONFIG
from rlpipe.app.driver import train
from rlpipe.cli.main import cli
from rlpipe.core.errors import ConfigError, GraphError, PlacementError
from rlpipe.plugins.tasks import scan_jsonl
from rlpipe.runtime.planning import plan_run, validate_run
from rlpipe.runtime.run_config import load_config
from rlpipe.testing import fake_devices


def config(registry, data=None):
    """The embedded default with ``data`` on top, read as a config file is
    (selecting another task drops the default task's options)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_text(yaml.safe_dump(data or {}))
        return load_config(registry, defaults=DEFAULT_CONFIG, files=[path])


def problems(registry, data):
    """The lines ``validate_run`` reports for the default config merged with ``data``."""
    with pytest.raises(ConfigError) as info:
        validate_run(config(registry, data), registry)
    lines = info.value.lines()
    assert all("\n" not in line for line in lines)
    return lines


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8")
    return path


def jsonl(path, **options):
    return {"task": {"name": "jsonl", "options": {"path": str(path), **options}}}


# -- a valid config passes ------------------------------------------------------------


def test_the_default_config_is_valid(registry):
    v = validate_run(config(registry), registry)
    assert v.graph.order[-1] == "trainer" and "rollout" in v.roles


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_every_example_config_is_valid(registry, name, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # their dataset paths are relative to the repository root
    monkeypatch.setenv("RLPIPE_CACHE_DIR", str(tmp_path))  # an empty model cache, as on a fresh machine
    cfg = load_config(registry, defaults=DEFAULT_CONFIG, files=[EXAMPLES / f"{name}.yaml"])
    try:
        validate_run(cfg, registry)
    except ConfigError as exc:
        # An example on a pretrained model: the one problem is the file to fetch, naming the command.
        (problem,) = exc.problems
        assert problem.path == "model.preset" and f"rlpipe models fetch {cfg.model.preset}" in problem.message


def test_the_algorithm_notes_come_back(registry):
    v = validate_run(config(registry, {"algorithm": {"name": "ppo"}}), registry)
    assert "critic" in v.config.roles and any("critic is added" in n for n in v.notes)


# -- datasets -------------------------------------------------------------------------


def test_a_malformed_jsonl_line_names_the_key_file_and_line(registry, tmp_path):
    path = write(tmp_path / "data.jsonl", [{"prompt": "1+1=", "answer": "2"}, '{"prompt": "no closing brace"',
                                           {"prompt": "no answer"}, "", {"prompt": "2+2=", "answer": 4}])
    assert problems(registry, jsonl(path)) == [
        f"task.options.path: {path}:2: invalid JSON: Expecting ',' delimiter (column 30)",
        f"task.options.path: {path}:3: missing answer field 'answer' (keys: 'prompt')",
    ]


def test_a_missing_dataset_names_the_key_and_the_path(registry, tmp_path):
    [line] = problems(registry, jsonl(tmp_path / "nope.jsonl"))
    assert line.startswith(f"task.options.path: {tmp_path / 'nope.jsonl'}: dataset file not found")


def test_a_bad_eval_file_is_reported_at_eval_path(registry, tmp_path):
    train_file = write(tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    held = write(tmp_path / "eval.jsonl", [{"prompt": "x"}])
    assert problems(registry, jsonl(train_file, eval_path=str(held))) == [
        f"task.options.eval_path: {held}:1: missing answer field 'answer' (keys: 'prompt')"]


def test_a_dataset_without_training_examples_is_reported(registry, tmp_path):
    empty = write(tmp_path / "empty.jsonl", ["", "  "])
    assert problems(registry, jsonl(empty)) == [f"task.options.path: {empty}: no training examples: it has no examples"]


def test_a_line_that_is_not_utf8_is_one_problem_among_the_others(registry, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n[1]\n')
    assert problems(registry, jsonl(path)) == [
        f"task.options.path: {path}:2: not UTF-8 text (byte 46 of the file)",
        f"task.options.path: {path}:3: expected a JSON object, got a list",
    ]


def test_scan_counts_examples_and_the_held_out_share_without_keeping_them(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": f"{i}+1=", "answer": i + 1} for i in range(200)])
    counts = scan_jsonl(path, eval_fraction=0.5)
    assert counts.examples == 200 and 50 < counts.held_out < 150


# -- batch arithmetic and the rollout ---------------------------------------------------

# The embedded default: 2 items x 32 prompts x 8 generations = 512 rows; trainer micro-batch 64.
BATCH_CASES = {
    "micro-batch vs global batch": (
        {"roles": {"trainer": {"micro_batch_size": 100}}},
        ("roles.trainer.micro_batch_size: 100 does not divide the global batch of 512 rows (train.items_per_step 2 × "
         "train.prompts_per_item 32 × roles.rollout.num_generations 8; roles.trainer.mini_batch_size is null: one "
         "update per global batch); the nearest that divide it: 64 or 128")),
    "micro-batch larger than the batch": (
        {"train": {"prompts_per_item": 4}, "roles": {"rollout": {"num_generations": 4}}},
        ("roles.trainer.micro_batch_size: 64 does not divide the global batch of 32 rows (train.items_per_step 2 × "
         "train.prompts_per_item 4 × roles.rollout.num_generations 4; roles.trainer.mini_batch_size is null: one "
         "update per global batch); the nearest that divide it: 32")),
    "mini-batch vs global batch": (
        {"roles": {"trainer": {"mini_batch_size": 192}}},
        ("roles.trainer.mini_batch_size: 192 does not divide the global batch of 512 rows (train.items_per_step 2 × "
         "train.prompts_per_item 32 × roles.rollout.num_generations 8); the nearest that divide it: 128 or 256")),
    "micro-batch vs mini-batch": (
        {"roles": {"trainer": {"mini_batch_size": 128, "micro_batch_size": 96}}},
        ("roles.trainer.micro_batch_size: 96 does not divide the mini-batch of 128 rows "
         "(roles.trainer.mini_batch_size); the nearest that divide it: 64 or 128")),
    "one generation per prompt for a group estimator": (
        {"roles": {"rollout": {"num_generations": 1}}},
        ("roles.rollout.num_generations: 1 completion per prompt, but algorithm 'grpo' (advantage estimator 'grpo') "
         "compares the completions of each prompt: a group of one gets advantage 0 and nothing is learned; use at least 2")),
    "one generation per prompt with dynamic sampling": (
        {"algorithm": {"name": "ppo", "options": {"dynamic_sampling": True}}, "roles": {"rollout": {"num_generations": 1}}},
        ("roles.rollout.num_generations: 1 completion per prompt, but algorithm.options.dynamic_sampling drops every "
         "group of fewer than 2 completions, so nothing is trained on; use at least 2")),
    "prompt and completion longer than the model's positions": (
        {"task": {"max_prompt_tokens": 500}, "roles": {"rollout": {"max_new_tokens": 16}}},
        ("roles.rollout.max_new_tokens: task.max_prompt_tokens 500 + roles.rollout.max_new_tokens 16 = 516 tokens, "
         "more than the 512 positions of the model (max_position_embeddings of model.preset 'tiny'); lower one of them")),
    "an unknown model preset": (
        {"model": {"preset": "tinny"}},
        "model.preset: unknown preset 'tinny' (did you mean 'tiny'?) (available: llama-3.2-1b, qwen2.5-0.5b, smollm2-135m-instruct, tiny)"),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_each_violated_relation_is_one_line_at_its_key(registry, case):
    data, expected = BATCH_CASES[case]
    assert problems(registry, data) == [expected]


@pytest.mark.parametrize("data", [
    {"algorithm": {"name": "ppo"}, "roles": {"rollout": {"num_generations": 1}}},  # GAE needs no group
    {"roles": {"trainer": {"mini_batch_size": 128, "micro_batch_size": 32}}},
    {"roles": {"trainer": {"micro_batch_size": 512}}},
    {"task": {"max_prompt_tokens": 480}, "roles": {"rollout": {"max_new_tokens": 32}}},  # exactly 512
    {"roles": {"critic": {"micro_batch_size": 7}, "reference": {"micro_batch_size": 7}},  # they pad their rows
     "algorithm": {"name": "ppo", "options": {"kl_beta": 0.1}}},
])
def test_relations_that_hold_pass(registry, data):
    validate_run(config(registry, data), registry)


# -- several problems at once ------------------------------------------------------------


def test_every_problem_is_reported_together(registry, tmp_path):
    lines = problems(registry, {
        **jsonl(tmp_path / "missing.jsonl"),
        "roles": {"trainer": {"micro_batch_size": 100, "colocate_with": "rolout"}, "rollout": {"num_generations": 1}},
        "algorithm": {"name": "grpo"},
    })
    keys = [line.split(":")[0] for line in lines]
    assert keys == ["roles.trainer.colocate_with", "task.options.path", "roles.rollout.num_generations",
                    "roles.trainer.micro_batch_size"]


def test_a_graph_problem_alone_keeps_its_kind(registry):
    with pytest.raises(GraphError):
        validate_run(config(registry, {"roles": {"reward": {"terms": {"nope": 1.0}}}}), registry)


# -- plan and train report them too ---------------------------------------------------------


def test_plan_reports_the_checks_before_placing(registry):
    with pytest.raises(ConfigError) as info:
        plan_run(config(registry, {"roles": {"trainer": {"micro_batch_size": 100}}}), registry, fake_devices(8))
    assert [line.split(":")[0] for line in info.value.lines()] == ["roles.trainer.micro_batch_size"]


def test_plan_of_the_disaggregated_example_on_one_device_suggests_devices(registry):
    cfg = load_config(registry, defaults=DEFAULT_CONFIG, files=[EXAMPLES / "disaggregated.yaml"])
    with pytest.raises(PlacementError) as info:
        plan_run(cfg, registry, fake_devices(1))
    [line] = info.value.lines()
    assert line == ("roles: the roles' meshes need 8 devices (trainer 4, rollout 4) but 1 exist; plan for them with "
                    "`rlpipe plan --devices 8`, or on the CPU fake them with "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8")


def test_the_cli_plan_suggests_devices_too():
    r = CliRunner().invoke(cli, ["plan", "-c", str(EXAMPLES / "disaggregated.yaml"), "--devices", "2"])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.strip().endswith("`rlpipe plan --devices 8`, or on the CPU fake them with "
                                     "XLA_FLAGS=--xla_force_host_platform_device_count=8")


def test_train_reports_them_before_building_anything(registry, tmp_path, monkeypatch):
    from rlpipe.app import driver

    def no_build(*args, **kwargs):
        raise AssertionError("stages were built")

    monkeypatch.setattr(driver, "build_stages", no_build)
    with pytest.raises(ConfigError) as info:
        train(config(registry, {"roles": {"trainer": {"micro_batch_size": 100}}}), registry, run_dir=tmp_path / "run")
    assert info.value.lines()[0].startswith("roles.trainer.micro_batch_size: 100 does not divide the global batch")
    assert not (tmp_path / "run" / "config.yaml").exists()
