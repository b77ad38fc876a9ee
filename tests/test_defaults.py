"""A run's config in layers: the toy's tuned values belong to the `tiny` preset
alone, and `rlpipe config show` says where every value came from."""

import yaml
from click.testing import CliRunner

from rlpipe.app.defaults import DEFAULT_CONFIG, resolve, source_of
from rlpipe.cli.main import cli


def show(*args):
    r = CliRunner().invoke(cli, ["config", "show", *args])
    assert r.exit_code == 0, r.output
    return r.stdout


def test_no_file_resolves_to_the_embedded_default():
    data, sources = resolve()
    assert data == DEFAULT_CONFIG
    assert sources["roles.trainer.learning_rate"] == "preset tiny"
    assert sources["task.name"] == "embedded default"


def test_a_pretrained_model_never_inherits_the_toys_values(tmp_path):
    data, sources = resolve(overrides=[f"model.path={tmp_path}"])
    assert "learning_rate" not in data["roles"]["trainer"]
    assert source_of("roles.trainer.learning_rate", sources) == "built-in default"
    text = show("--set", f"model.path={tmp_path}")
    trainer = yaml.safe_load(text)["roles"]["trainer"]
    assert trainer["learning_rate"] == 1e-6 and trainer["grad_clip"] == 1.0 and trainer["num_iterations"] == 1
    assert yaml.safe_load(text)["roles"]["rollout"]["max_new_tokens"] != 2


def test_a_preset_brings_its_own_defaults():
    data, sources = resolve(overrides=["model.preset=smollm2-135m-instruct"])
    assert data["roles"]["rollout"] == {"temperature": 0.7} and data["roles"]["trainer"] == {"remat": True}
    assert sources["roles.rollout.temperature"] == "preset smollm2-135m-instruct"


def test_config_show_annotates_every_value_and_still_loads_back(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("task:\n  name: add\nroles:\n  rollout:\n    mesh: {shape: [1, 1], axes: [fsdp, tp]}\n")
    text = show("-c", str(file), "--set", "train.steps=5")
    lines = text.splitlines()
    assert "    learning_rate: 0.005  # preset tiny" in lines
    assert "  steps: 5  # --set train.steps=5" in lines
    assert f"  name: add  # file {file}" in lines
    assert f"      shape: [1, 1]  # file {file}" in lines
    assert "    grad_clip: 1.0  # built-in default" in lines
    # The add task's options start from its own defaults, not the reverse task's.
    assert all(line.endswith("# built-in default") for line in lines[lines.index("  options:") + 1:][:1])
    plain = yaml.safe_load(show("-c", str(file), "--set", "train.steps=5", "--json"))
    assert yaml.safe_load(text) == plain


def test_removing_a_role_is_attributed_to_the_override():
    assert "  reference: null  # --set roles.reference=null" in show("--set", "roles.reference=null").splitlines()
