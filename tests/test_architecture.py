"""``model.architecture``: an explicit, randomly initialised decoder shape
besides presets and checkpoints, through config validate, plan and train."""

import json

import jax
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from flax import nnx

from rlpipe.app import defaults
from rlpipe.cli.main import cli
from rlpipe.core.config import merge
from rlpipe.core.errors import ConfigError
from rlpipe.core.plugins import load_registry
from rlpipe.models import memory
from rlpipe.models.config import DecoderConfig
from rlpipe.models.loading import load_model, random_init_shape
from rlpipe.runtime.run_config import build_config

TINY = {"family": "qwen2", "layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "vocab": 128}
# Small enough that two steps take seconds: 2 prompts x 2 completions x 2 tokens.
QUICK_RUN = ["--set", "train.steps=2", "--set", "train.prompts_per_item=2", "--set", "train.items_per_step=2",
             "--set", "roles.rollout.num_generations=2", "--set", "roles.rollout.max_new_tokens=2"]


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def config_with(registry, architecture, **model):
    data, _ = defaults.resolve()
    return build_config(merge(data, {"model": {"architecture": architecture, **model}}), registry)


def problems(registry, architecture, **model):
    with pytest.raises(ConfigError) as exc:
        config_with(registry, architecture, **model)
    return [str(p) for p in exc.value.problems]


def run(*args):
    return CliRunner().invoke(cli, list(args))


def arch_args(arch=TINY):
    return ["--set", "model.architecture=" + json.dumps(arch)]


def test_derived_keys_are_filled_in_and_mapped_to_the_decoder_shape(registry):
    config = config_with(registry, TINY)
    arch = config.model.architecture
    assert (arch.head_dim, arch.ffn, arch.qkv_bias, arch.tied) == (8, 128, True, False)
    shape = random_init_shape(config.model)
    assert shape == DecoderConfig(architecture="qwen2", vocab_size=128, hidden_size=32, intermediate_size=128,
                                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                                  rms_norm_eps=1e-6, max_position_embeddings=2048)
    # The memory estimates and the rollout's position check read the same shape.
    assert memory.model_shape(config.model) == shape
    llama = config_with(registry, {"layers": 1, "hidden": 48, "heads": 3, "vocab": 64, "ffn": 100, "head_dim": 20}).model.architecture
    assert (llama.family, llama.kv_heads, llama.head_dim, llama.ffn, llama.qkv_bias) == ("llama", 3, 20, 100, False)


def test_the_resolved_config_round_trips_with_the_derived_keys(registry):
    config = config_with(registry, TINY)
    again = build_config(config.to_dict(), registry)
    assert again.model.architecture == config.model.architecture
    assert config.to_dict()["model"]["architecture"]["head_dim"] == 8


@pytest.mark.parametrize("change, expected", [
    ({"family": "gpt2"}, "model.architecture.family: must be 'llama' or 'qwen2', got 'gpt2'"),
    ({"layers": 0}, "model.architecture.layers: must be at least 1, got 0"),
    ({"kv_heads": 3}, "model.architecture.kv_heads: 4 heads are not a multiple of 3 kv_heads; choose kv_heads dividing heads"),
    ({"hidden": 30}, ("model.architecture.head_dim: hidden 30 is not a multiple of 4 heads, so head_dim cannot be "
                      "derived; set head_dim or make hidden a multiple of heads")),
    ({"hiden": 32}, "model.architecture.hiden: unknown key (did you mean 'hidden'?)"),
    ({"vocab": None}, "model.architecture.vocab: required key missing"),
])
def test_a_bad_architecture_is_one_line_naming_the_key(registry, change, expected):
    arch = merge(TINY, change)
    found = problems(registry, arch)
    assert len(found) == 1 and "\n" not in found[0]
    assert found[0].startswith(expected)


def test_head_dim_may_differ_from_hidden_over_heads(registry):
    config = config_with(registry, {**TINY, "hidden": 30, "head_dim": 16})
    assert random_init_shape(config.model).dim_per_head == 16


def test_architecture_and_path_exclude_each_other(registry, tmp_path):
    config = config_with(registry, TINY, path=str(tmp_path))
    found = [str(p) for p in config.model.run_problems(config)]
    assert found == [(f"model.architecture: a random-init shape, but model.path '{tmp_path}' names a checkpoint "
                      "with its own; set one of them")]


def test_the_tiny_presets_tuned_defaults_do_not_apply_to_an_architecture():
    data, _ = defaults.resolve(overrides=["model.architecture=" + json.dumps(TINY)])
    assert defaults.model_preset(data) is None
    assert "learning_rate" not in data["roles"]["trainer"]  # the tiny preset's 5e-3 is its own


def test_the_model_is_randomly_initialised_from_the_seed(registry):
    model_config = config_with(registry, TINY).model

    def leaves(seed):
        return jax.tree_util.tree_leaves(nnx.split(load_model(model_config, seed=seed))[1])

    a, b, c = leaves(0), leaves(0), leaves(1)
    assert [x.shape for x in a] == [x.shape for x in c]
    shapes = {x.shape for x in a}
    assert {(128, 32), (32, 32), (32, 16), (16,), (32, 128), (128, 32)} <= shapes  # embed, q, k, k bias, up, down
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_config_validate_accepts_it_and_reports_a_bad_one():
    r = run("config", "validate", *arch_args())
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("config is valid")
    r = run("config", "validate", *arch_args({**TINY, "kv_heads": 3}))
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("error: model.architecture.kv_heads: 4 heads are not a multiple of 3 kv_heads")


def test_plan_estimates_memory_from_the_architecture():
    small = run("plan", "--json", *arch_args())
    big = run("plan", "--json", *arch_args({**TINY, "hidden": 256, "heads": 8, "kv_heads": 8}))
    assert small.exit_code == 0 and big.exit_code == 0, small.stderr + big.stderr

    def trainer_bytes(r):
        return next(role for role in json.loads(r.stdout)["roles"] if role["name"] == "trainer")["memory_estimate_bytes"]

    assert trainer_bytes(big) > trainer_bytes(small)


@pytest.mark.slow
def test_train_runs_two_steps_of_an_architecture(tmp_path):
    run_dir = tmp_path / "run"
    r = run("train", "-q", *arch_args(), *QUICK_RUN, "--run-dir", str(run_dir))
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["architecture"]["hidden"] == 32 and saved["model"]["architecture"]["head_dim"] == 8
