"""Config loading: embedded defaults, YAML files merged in order, ``--set``
overrides parsed as YAML, ``null`` removing keys, strict structuring, one-line
errors with their paths (exit status 2, no traceback), ``rlpipe config show``
round trips, and property-based checks that no input makes the CLI crash."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner
from helpers import EXAMPLES, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlpipe.app.defaults import DEFAULT_CONFIG
from rlpipe.cli.main import cli
from rlpipe.core.config import (
    MeshConfig,
    merge,
    parse_override,
    read_yaml_file,
    resolve_sources,
)
from rlpipe.core.errors import ConfigError
from rlpipe.runtime.run_config import (
    SELECTING_KEYS,
    RunConfig,
    build_config,
    load_config,
)

# -- helpers ----------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def assert_clean_exit(result) -> None:
    """Exit 0 or 2 through the CLI's own handling: no exception escaped."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def error_lines(result) -> list[str]:
    """The stderr lines of a config error, checked to be the documented shape:
    exit status 2, nothing on stdout, every line ``error: <path>: <reason>``."""
    assert_clean_exit(result)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines, "a config error must say something"
    for line in lines:
        assert re.match(r"error: \S.*?: \S", line), line
    return lines


def show_json(*args: str) -> dict:
    result = invoke("config", "show", "--json", *args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return json.loads(result.stdout)


def example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())


# -- sources: defaults, files, --set -----------------------------------------------------


def test_embedded_defaults_are_used_without_files_or_overrides(registry):
    cfg = load_config(registry, defaults=DEFAULT_CONFIG)
    assert list(cfg.roles) == ["rollout", "reward", "reference", "trainer"]
    assert cfg.roles["reward"].on_error == "fail"
    assert cfg.placement.policy == "default" and cfg.placement.offload is False
    assert (cfg.train.steps, cfg.train.seed, cfg.train.max_staleness) == (20, 0, 0)
    assert cfg.roles["rollout"].mesh is None and cfg.roles["rollout"].temperature == 1.0
    # The CLI resolves exactly the same thing with no arguments.
    assert show_json() == cfg.to_dict()


def test_resolve_sources_does_not_mutate_the_defaults():
    before = json.dumps(DEFAULT_CONFIG, sort_keys=True)
    resolve_sources(DEFAULT_CONFIG, overrides=["roles.reference=null", "train.steps=3", "roles.rollout.mesh.shape=[1,4]"], selecting=SELECTING_KEYS)
    assert json.dumps(DEFAULT_CONFIG, sort_keys=True) == before


def test_merge_merges_mappings_replaces_everything_else_and_null_removes():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2, "c": {"d": 3}}
    out = merge(base, {"a": {"y": [9], "z": 3}, "b": {"now": "a mapping"}, "c": None, "e": None})
    assert out == {"a": {"x": 1, "y": [9], "z": 3}, "b": {"now": "a mapping"}}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 2, "c": {"d": 3}}  # not mutated


def test_several_yaml_files_merge_in_order_later_files_win(tmp_path, registry):
    first = write(tmp_path, "first.yaml", """
train: {steps: 5, seed: 7}
roles:
  rollout: {temperature: 0.5, mesh: {shape: [1, 4], axes: [fsdp, tp]}}
""")
    second = write(tmp_path, "second.yaml", """
train: {steps: 9}
roles:
  rollout: {top_k: 3, mesh: {shape: [2], axes: [dp]}}
""")
    cfg = load_config(registry, defaults=DEFAULT_CONFIG, files=[first, second])
    assert (cfg.train.steps, cfg.train.seed) == (9, 7)
    ro = cfg.roles["rollout"]
    assert (ro.temperature, ro.top_k) == (0.5, 3)
    assert ro.mesh == MeshConfig(shape=(2,), axes=("dp",))  # lists replace, they do not concatenate
    # Reversed order, reversed winner; the CLI agrees with the API.
    assert show_json("-c", second, "-c", first)["train"]["steps"] == 5
    assert show_json("-c", first, "-c", second) == cfg.to_dict()


def test_empty_yaml_file_changes_nothing(tmp_path, registry):
    empty = write(tmp_path, "empty.yaml", "# nothing here\n")
    assert read_yaml_file(empty) == {}
    assert load_config(registry, defaults=DEFAULT_CONFIG, files=[empty]) == load_config(registry, defaults=DEFAULT_CONFIG)


def test_set_overrides_apply_after_files_and_in_order(tmp_path):
    f = write(tmp_path, "c.yaml", "train: {steps: 5, seed: 1}\n")
    data = show_json("-c", f, "--set", "train.steps=6", "--set", "train.steps=7", "--set", "train.max_staleness=2")
    assert data["train"] == {"steps": 7, "seed": 1, "max_staleness": 2, "prompts_per_item": 32, "items_per_step": 2}


@pytest.mark.parametrize("text, expected", [
    ("train.steps=3", {"train": {"steps": 3}}),
    ("roles.rollout.temperature=0.25", {"roles": {"rollout": {"temperature": 0.25}}}),
    ("placement.offload=true", {"placement": {"offload": True}}),
    ("placement.policy=colocate-all", {"placement": {"policy": "colocate-all"}}),
    ("a.b='4'", {"a": {"b": "4"}}),
    ("roles.rollout.mesh.shape=[1,4]", {"roles": {"rollout": {"mesh": {"shape": [1, 4]}}}}),
    ("roles.rollout.mesh={shape: [2], axes: [dp]}", {"roles": {"rollout": {"mesh": {"shape": [2], "axes": ["dp"]}}}}),
    ("roles.reference=null", {"roles": {"reference": None}}),
    ("train.steps=", {"train": {"steps": None}}),
    ("a.b=x=y", {"a": {"b": "x=y"}}),
    (" train.seed =1", {"train": {"seed": 1}}),
    ("roles.trainer.learning_rate=3e-4", {"roles": {"trainer": {"learning_rate": 3e-4}}}),
    ("roles.trainer.learning_rate=1.0e5", {"roles": {"trainer": {"learning_rate": 1e5}}}),
    ("roles.reference.checkpoint='1e5'", {"roles": {"reference": {"checkpoint": "1e5"}}}),
])
def test_set_value_is_parsed_as_a_yaml_scalar_or_flow_collection(text, expected):
    assert parse_override(text) == expected


def test_set_mesh_shape_flow_list_reaches_the_role(registry):
    cfg = load_config(registry, defaults=DEFAULT_CONFIG,
                      overrides=["roles.rollout.mesh.shape=[1,4]", "roles.rollout.mesh.axes=[fsdp, tp]"])
    assert cfg.roles["rollout"].mesh == MeshConfig(shape=(1, 4), axes=("fsdp", "tp"))
    assert show_json("--set", "roles.rollout.mesh.shape=[1,4]", "--set", "roles.rollout.mesh.axes=[fsdp,tp]")[
        "roles"]["rollout"]["mesh"] == {"shape": [1, 4], "axes": ["fsdp", "tp"]}


def test_set_null_removes_a_role():
    data = show_json("--set", "roles.reference=null")
    assert data["roles"]["reference"] is None  # shown as removed, so the output loads back the same
    assert [n for n, v in data["roles"].items() if v is not None] == ["rollout", "reward", "trainer"]
    # without a KL term the algorithm does not need the reference: it stays out of the graph
    result = invoke("config", "validate", "--set", "roles.reference=null", "--set", "algorithm.options.kl_beta=0")
    assert result.exit_code == 0, result.output
    assert result.stdout == "config is valid: roles rollout, reward, trainer; placement policy default\n"
    assert result.stderr == ""


def test_the_algorithm_adds_back_a_removed_role_it_needs():
    # grpo's default KL term (beta 0.04) needs the reference: removing it alone does not take it out
    result = invoke("config", "validate", "--set", "roles.reference=null")
    assert result.exit_code == 0, result.output
    assert result.stdout == ("config is valid: roles rollout, reward, reference, trainer; placement policy default\n"
                             "note: reference is added with default settings: algorithm 'grpo' needs it\n")
    plan = invoke("plan", "--set", "roles.reference=null")
    assert plan.exit_code == 0, plan.output
    assert "note: reference is added with default settings: algorithm 'grpo' needs it" in plan.stdout.splitlines()


def test_null_in_a_later_file_restores_the_default(tmp_path):
    a = write(tmp_path, "a.yaml", "train: {steps: 5}\nroles: {rollout: {top_k: 7}}\n")
    b = write(tmp_path, "b.yaml", "train: {steps: null}\nroles: {rollout: {top_k: null}}\n")
    data = show_json("-c", a, "-c", b)
    assert data["train"]["steps"] == 20 and data["roles"]["rollout"]["top_k"] == 0


def test_a_role_can_be_added_with_an_empty_section():
    data = show_json("--set", "roles.critic={}")
    assert list(data["roles"]) == ["rollout", "reward", "reference", "trainer", "critic"]
    assert data["roles"]["critic"]["learning_rate"] == pytest.approx(1e-5)


def test_exponent_notation_in_a_file_is_a_number_as_in_json(tmp_path, registry):
    path = write(tmp_path, "c.yaml", "roles:\n  trainer: {learning_rate: 3e-4}\n  rollout: {temperature: .5e1}\n")
    cfg = load_config(registry, defaults=DEFAULT_CONFIG, files=[path])
    assert cfg.roles["trainer"].learning_rate == pytest.approx(3e-4)
    assert cfg.roles["rollout"].temperature == pytest.approx(5.0)


def test_int_is_accepted_where_a_number_is_expected(registry):
    cfg = load_config(registry, defaults=DEFAULT_CONFIG, overrides=["roles.rollout.temperature=1"])
    assert cfg.roles["rollout"].temperature == 1.0 and isinstance(cfg.roles["rollout"].temperature, float)


# -- errors: one line each, path and reason, exit 2, no traceback --------------------------


def test_mesh_shape_that_is_not_a_list_of_ints_is_one_line_at_the_field():
    result = invoke("config", "validate", "--set", "roles.rollout.mesh.shape=four", "--set", "roles.rollout.mesh.axes=[x]")
    assert error_lines(result) == ["error: roles.rollout.mesh.shape: expected a list of ints, got 'four'"]


def test_bad_item_in_a_mesh_shape_is_located_at_its_index():
    result = invoke("config", "validate", "--set", "roles.rollout.mesh={shape: [1, x], axes: [a, b]}")
    assert error_lines(result) == ["error: roles.rollout.mesh.shape[1]: expected an int, got 'x'"]


def test_unknown_role_suggests_the_close_name_and_lists_available_roles():
    [line] = error_lines(invoke("config", "validate", "--set", "roles.rolout={}"))
    assert line.startswith("error: roles.rolout: unknown role 'rolout' (did you mean 'rollout'?) ")
    available = re.search(r"\(available: ([^)]*)\)$", line).group(1).split(", ")
    assert {"critic", "reference", "rollout", "trainer"} <= set(available) and available == sorted(available)


@pytest.mark.parametrize("override, path, hint", [
    ("train.stpes=3", "train.stpes", "steps"),
    ("roles.rollout.temprature=0.5", "roles.rollout.temprature", "temperature"),
    ("roles.rollout.mesh.axis=[a]", "roles.rollout.mesh.axis", "axes"),
    ("placement.ofload=true", "placement.ofload", "offload"),
])
def test_misspelt_key_in_a_section_suggests_the_valid_key(override, path, hint):
    lines = error_lines(invoke("config", "validate", "--set", override,
                               "--set", "roles.rollout.mesh.shape=[1]", "--set", "roles.rollout.mesh.axes=[a]"))
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {path}: unknown key (did you mean {hint!r}?)")
    assert "valid keys:" in lines[0]


def test_unknown_top_level_section_suggests_a_close_match():
    [line] = error_lines(invoke("config", "validate", "--set", "trian.steps=3"))
    assert line == "error: trian: unknown section (did you mean 'train'?) (valid sections: model, task, algorithm, roles, placement, train, checkpoint, telemetry)"


def test_the_algorithm_section_selects_a_plugin_whose_class_types_its_options(registry):
    from rlpipe.plugins.algorithms.presets import GRPOConfig, PPOConfig

    cfg = load_config(registry, defaults=DEFAULT_CONFIG)
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.options == GRPOConfig()
    cfg = load_config(registry, defaults=DEFAULT_CONFIG, overrides=["algorithm.name=ppo", "algorithm.options.kl_beta=0.04"])
    assert cfg.algorithm.options == PPOConfig(kl_beta=0.04)
    [line] = error_lines(invoke("config", "validate", "--set", "algorithm.name=grop"))
    assert line.startswith("error: algorithm.name: unknown algorithm 'grop' (did you mean 'grpo'?) (available: ")
    [line] = error_lines(invoke("config", "validate", "--set", "algorithm.options.kl_bta=1"))
    assert line.startswith("error: algorithm.options.kl_bta: unknown key (did you mean 'kl_beta'?)")
    assert error_lines(invoke("config", "validate", "--set", "algorithm.options.kl_beta=-1")) == [
        "error: algorithm.options.kl_beta: must be at least 0, got -1.0"]


def test_unknown_section_without_a_close_match_has_no_suggestion():
    [line] = error_lines(invoke("config", "validate", "--set", "zzzzzz.q=1"))
    assert line.startswith("error: zzzzzz: unknown section (valid sections:")


def test_unknown_placement_policy_suggests_and_lists_available():
    [line] = error_lines(invoke("config", "validate", "--set", "placement.policy=defualt"))
    prefix = "error: placement.policy: unknown placement policy 'defualt' (did you mean 'default'?) (available: "
    assert line.startswith(prefix) and line.endswith(")")
    available = line[len(prefix):-1].split(", ")
    assert {"colocate-all", "default", "disaggregated"} <= set(available) and available == sorted(available)


@pytest.mark.parametrize("override, expected", [
    ("train.steps='4'", "train.steps: expected an int, got '4'"),
    ("train.steps=true", "train.steps: expected an int, got True"),
    ("train.steps=4.0", "train.steps: expected an int, got 4.0"),
    ("train.seed=[1]", "train.seed: expected an int, got [1]"),
    ("placement.offload=1", "placement.offload: expected a boolean, got 1"),
    ("placement.offload='true'", "placement.offload: expected a boolean, got 'true'"),
    ("placement.policy=3", "placement.policy: expected a string, got 3"),
    ("roles.rollout.temperature=hot", "roles.rollout.temperature: expected a number, got 'hot'"),
    ("roles.rollout.temperature=false", "roles.rollout.temperature: expected a number, got False"),
    ("roles.rollout.mesh={shape: [2], axes: tp}", "roles.rollout.mesh.axes: expected a list of strings, got 'tp'"),
    ("train=[1, 2]", "train: expected a mapping of steps, seed, max_staleness, prompts_per_item, items_per_step, got [1, 2]"),
    ("roles=[rollout]", "roles: expected a mapping of role name to section, got ['rollout']"),
])
def test_wrong_scalar_types_are_rejected_not_coerced(override, expected):
    assert error_lines(invoke("config", "validate", "--set", override)) == [f"error: {expected}"]


def test_role_section_that_is_not_a_mapping_lists_the_role_keys():
    [line] = error_lines(invoke("config", "validate", "--set", "roles.rollout=3"))
    assert line.startswith("error: roles.rollout: expected a mapping of mesh, colocate_with, offload, ")
    assert "temperature" in line and line.endswith(", got 3")


def test_strings_are_not_split_into_lists_of_characters():
    result = invoke("config", "validate", "--set", "roles.rollout.mesh={shape: [2], axes: ab}")
    assert error_lines(result) == ["error: roles.rollout.mesh.axes: expected a list of strings, got 'ab'"]


@pytest.mark.parametrize("override, expected", [
    ("train.max_staleness=-1", "train.max_staleness: must be at least 0, got -1"),
    ("train.steps=0", "train.steps: must be at least 1, got 0"),
    ("roles.rollout.top_p=0", "roles.rollout.top_p: must be in (0, 1], got 0.0"),
    ("roles.trainer.learning_rate=-0.1", "roles.trainer.learning_rate: must be positive, got -0.1"),
    ("roles.rollout.colocate_with=''", "roles.rollout.colocate_with: must be a role name"),
])
def test_validator_errors_end_at_the_field(override, expected):
    assert error_lines(invoke("config", "validate", "--set", override)) == [f"error: {expected}"]


def test_mesh_axes_count_mismatch_is_reported_at_axes():
    [line] = error_lines(invoke("config", "validate", "--set", "roles.rollout.mesh={shape: [1, 4], axes: [fsdp]}"))
    assert line.startswith("error: roles.rollout.mesh.axes: 1 axis name(s) for a 2-dimensional shape [1, 4]")


def test_duplicate_mesh_axis_names_are_reported_at_axes():
    [line] = error_lines(invoke("config", "validate", "--set", "roles.rollout.mesh={shape: [2, 2], axes: [tp, tp]}"))
    assert line == "error: roles.rollout.mesh.axes: duplicate axis name(s) 'tp'"


def test_mesh_dimensions_must_be_positive():
    [line] = error_lines(invoke("config", "validate", "--set", "roles.rollout.mesh={shape: [2, 0], axes: [a, b]}"))
    assert line == "error: roles.rollout.mesh.shape: every dimension must be at least 1, got (2, 0)"


def test_mesh_without_axes_reports_the_missing_required_key():
    assert error_lines(invoke("config", "validate", "--set", "roles.rollout.mesh.shape=[1,4]")) == [
        "error: roles.rollout.mesh.axes: required key missing"]


def test_yaml_syntax_error_is_reported_as_file_line_column(tmp_path):
    path = write(tmp_path, "bad.yaml", "train:\n  steps: 5\n   seed: 3\n")
    [line] = error_lines(invoke("config", "validate", "-c", path))
    assert line == f"error: {path}:3:8: invalid YAML: mapping values are not allowed here"


def test_unclosed_flow_list_is_reported_at_its_line(tmp_path):
    path = write(tmp_path, "bad.yaml", "train:\n  steps: 5\n  seed: [1, 2\nplacement: {}\n")
    [line] = error_lines(invoke("config", "validate", "-c", path))
    assert re.fullmatch(re.escape(f"error: {path}:") + r"4:\d+: invalid YAML: .+", line), line


def test_config_file_that_does_not_exist(tmp_path):
    path = str(tmp_path / "missing.yaml")
    assert error_lines(invoke("config", "validate", "-c", path)) == [
        f"error: {path}: cannot read config file: No such file or directory"]


def test_config_file_that_is_not_utf8_text_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  steps: 5 # caf\xe9\n".encode("latin-1"))
    [line] = error_lines(invoke("config", "validate", "-c", str(path)))
    assert line.startswith(f"error: {path}: cannot read config file: not UTF-8 text")


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_top_level_yaml_that_is_not_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, "c.yaml", text)
    assert error_lines(invoke("config", "validate", "-c", path)) == [
        f"error: {path}: expected a mapping at the top level, got {kind}"]


@pytest.mark.parametrize("arg, expected", [
    ("train.steps", "error: --set: 'train.steps': expected KEY=VALUE, e.g. train.steps=10"),
    ("=3", "error: --set: '=3': expected KEY=VALUE, e.g. train.steps=10"),
    ("train..steps=3", "error: --set: 'train..steps=3': 'train..steps' is not a dotted key"),
])
def test_malformed_set_is_a_one_line_usage_error(arg, expected):
    assert error_lines(invoke("config", "validate", "--set", arg)) == [expected]


def test_set_value_that_is_not_valid_yaml_names_the_key():
    [line] = error_lines(invoke("config", "validate", "--set", "train.steps=[1,"))
    assert line.startswith("error: train.steps: --set value '[1,' is not valid YAML: ")


def test_set_value_with_a_control_character_is_still_one_line():
    [line] = error_lines(invoke("config", "validate", "--set", "train.steps=\x00"))
    assert line.startswith("error: train.steps: --set value '\\x00' is not valid YAML: unacceptable character")


def test_keys_with_line_breaks_keep_each_problem_on_one_line(tmp_path):
    path = write(tmp_path, "c.yaml", 'train: {"st\\neps": 1}\nroles: {"a\\nb": {}}\n"x\\ry": 1\n')
    lines = error_lines(invoke("config", "validate", "-c", path))
    assert len(lines) == 3
    assert any(line.startswith("error: train.'st\\neps': unknown key") for line in lines)
    assert any(line.startswith("error: roles.'a\\nb': unknown role") for line in lines)
    assert any(line.startswith("error: 'x\\ry': unknown section") for line in lines)


@pytest.mark.parametrize("overrides, expected", [
    (["placement.options=false"], "error: placement.options: policy 'default' takes no options"),
    (["placement.options=[]"], "error: placement.options: policy 'default' takes no options"),
    (["placement.policy=disaggregated", "placement.options=0"],
     "error: placement.options: expected a mapping of groups, got 0"),
])
def test_falsy_placement_options_are_checked_not_ignored(overrides, expected):
    args = [a for o in overrides for a in ("--set", o)]
    assert error_lines(invoke("config", "validate", *args)) == [expected]


def test_policy_options_are_typed_by_the_selected_policy():
    ok = invoke("config", "validate", "--set", "placement.policy=disaggregated",
                "--set", "placement.options={groups: [{roles: [rollout], fraction: 0.5}, {roles: [trainer], fraction: 0.5}]}")
    assert ok.exit_code == 0, ok.output
    lines = error_lines(invoke("config", "validate", "--set", "placement.policy=disaggregated",
                               "--set", "placement.options={groups: [{roles: [rollout], fration: 0.5}]}"))
    assert lines == ["error: placement.options.groups[0].fraction: required key missing",
                     "error: placement.options.groups[0].fration: unknown key (did you mean 'fraction'?) (valid keys: roles, fraction)"]


def test_every_bad_list_item_is_reported_at_its_index():
    lines = error_lines(invoke("config", "validate", "--set", "placement.policy=disaggregated",
                               "--set", "placement.options={groups: [{roles: [rollout], fraction: 0.5}, {roles: [3], fraction: x}]}",
                               "--set", "roles.rollout.mesh={shape: [x, 1, y], axes: [a, 3, c]}"))
    assert sorted(lines) == sorted([
        "error: placement.options.groups[1].roles[0]: expected a string, got 3",
        "error: placement.options.groups[1].fraction: expected a number, got 'x'",
        "error: roles.rollout.mesh.shape[0]: expected an int, got 'x'",
        "error: roles.rollout.mesh.shape[2]: expected an int, got 'y'",
        "error: roles.rollout.mesh.axes[1]: expected a string, got 3",
    ])


def test_several_problems_are_reported_together_in_one_run(tmp_path):
    path = write(tmp_path, "c.yaml", "train: {steps: 0}\nroles: {rolout: {}}\nplacment: {}\n")
    lines = error_lines(invoke("config", "validate", "-c", path, "--set", "placement.offload=3",
                               "--set", "roles.rollout.mesh.shape=four", "--set", "roles.rollout.mesh.axes=[a]"))
    paths = [line.split(": ")[1] for line in lines]
    assert sorted(paths) == sorted(["placment", "train.steps", "placement.offload", "roles.rolout", "roles.rollout.mesh.shape"])


def test_load_config_raises_config_error_with_every_problem(registry):
    with pytest.raises(ConfigError) as info:
        load_config(registry, defaults=DEFAULT_CONFIG, overrides=["train.steps=x", "train.seed=y", "roles.rolout={}"])
    assert [p.path for p in info.value.problems] == ["train.steps", "train.seed", "roles.rolout"]
    assert info.value.problems[0].message == "expected an int, got 'x'"
    assert info.value.exit_code == 2


def test_real_process_exits_2_with_one_line_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "rlpipe", "config", "validate", "--set", "train.steps=x"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == "error: train.steps: expected an int, got 'x'\n"


# -- config show round trips ---------------------------------------------------------------


ROUND_TRIP_CASES = {
    "defaults": [],
    "colocated_offload": ["-c", str(EXAMPLES / "colocated_offload.yaml")],
    "disaggregated_example": ["-c", str(EXAMPLES / "disaggregated.yaml")],
    "critic_and_sampling": ["--set", "roles.critic={micro_batch_size: 2}", "--set", "roles.rollout.temperature=0.7",
                            "--set", "roles.rollout.top_p=0.9", "--set", "roles.reference.checkpoint='1e5'",
                            "--set", "roles.critic.learning_rate=2.5e-6"],
    "disaggregated_policy": ["--set", "placement.policy=disaggregated", "--set",
                             "placement.options={groups: [{roles: [rollout], fraction: 0.25}, {roles: [trainer, reference], fraction: 0.75}]}"],
    "train_and_offload": ["--set", "train={steps: 3, seed: -5, max_staleness: 2}", "--set", "placement.offload=true",
                          "--set", "roles.trainer.offload=false", "--set", "roles.trainer.learning_rate=3e-4"],
}


def _resolved(registry, args) -> RunConfig:
    files = [args[i + 1] for i, a in enumerate(args) if a == "-c"]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return load_config(registry, defaults=DEFAULT_CONFIG, files=files, overrides=overrides)


@pytest.mark.parametrize("case", sorted(ROUND_TRIP_CASES))
def test_config_show_yaml_loads_back_to_an_identical_config(tmp_path, registry, case):
    args = ROUND_TRIP_CASES[case]
    original = _resolved(registry, args)
    result = invoke("config", "show", *args)
    assert result.exit_code == 0 and result.stderr == "", result.output
    path = write(tmp_path, "resolved.yaml", result.stdout)
    # As a config file on top of the defaults (what `rlpipe train -c run/config.yaml` does) ...
    again = load_config(registry, defaults=DEFAULT_CONFIG, files=[path])
    assert again == original and list(again.roles) == list(original.roles)
    # ... on its own, with nothing underneath ...
    assert build_config(yaml.safe_load(result.stdout), registry) == original
    # ... and through the CLI, byte for byte but for the comments saying where each value came from.
    def values(text):
        return re.sub(r"  # .*$", "", text, flags=re.M)

    assert values(invoke("config", "show", "-c", path).stdout) == values(result.stdout)


@pytest.mark.parametrize("case", sorted(ROUND_TRIP_CASES))
def test_config_show_json_loads_back_to_an_identical_config(tmp_path, registry, case):
    args = ROUND_TRIP_CASES[case]
    original = _resolved(registry, args)
    result = invoke("config", "show", "--json", *args)
    assert result.exit_code == 0 and result.stderr == "", result.output
    data = json.loads(result.stdout)
    assert data == original.to_dict()
    assert build_config(data, registry) == original
    path = write(tmp_path, "resolved.json", result.stdout)  # JSON is YAML
    assert load_config(registry, defaults=DEFAULT_CONFIG, files=[path]) == original


# -- property-based: no input makes the CLI crash --------------------------------------------


VALID_VARIATIONS = [
    {},
    example("colocated"),
    example("colocated_offload"),
    example("disaggregated"),
    {"roles": {"critic": {}}},
    {"roles": {"reference": None}},
    {"placement": {"policy": "disaggregated", "options": {"groups": [
        {"roles": ["rollout"], "fraction": 0.25}, {"roles": ["trainer", "reference"], "fraction": 0.75}]}}},
    {"placement": {"policy": "colocate-all", "offload": True}},
    {"train": {"steps": 3, "seed": 42, "max_staleness": 2}},
    {"roles": {"rollout": {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "num_generations": 8, "engine": "jax"},
               "reference": {"checkpoint": "/models/ref", "micro_batch_size": 2, "offload": True}}},
]
BASES = [merge(DEFAULT_CONFIG, v) for v in VALID_VARIATIONS]

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
KEYS = st.one_of(TEXT, st.sampled_from(["steps", "seed", "mesh", "shape", "axes", "policy", "options", "rollout",
                                        "critic", "groups", "fraction", "colocate_with", "offload", "<<", "null"]))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-3, max_value=8),
    st.floats(allow_nan=True, allow_infinity=True), TEXT,
    st.sampled_from(["rollout", "trainer", "actor", "default", "disaggregated", "four", "1", "", "yes"]),
)
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
                    max_leaves=10)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _paths(node, prefix=()):
    """Every (path, is_mapping_key) below ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,), True
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,), False
            yield from _paths(v, prefix + (i,))


def _parent(data, path):
    for p in path[:-1]:
        data = data[p]
    return data


def _misspell(draw, key: str) -> str:
    if not key:
        return draw(TEXT.filter(bool))
    i = draw(st.integers(0, len(key) - 1))
    op = draw(st.sampled_from(["drop", "double", "swap", "replace", "upper"]))
    if op == "drop":
        out = key[:i] + key[i + 1:]
    elif op == "double":
        out = key[:i] + key[i] + key[i:]
    elif op == "swap" and len(key) > 1:
        j = min(i + 1, len(key) - 1)
        out = key[:i] + key[j] + key[i + 1:j] + key[i] + key[j + 1:] if j > i else key[::-1]
    elif op == "upper":
        out = key[:i] + key[i].swapcase() + key[i + 1:]
    else:
        out = key[:i] + draw(st.sampled_from("abcxyz_-.0")) + key[i + 1:]
    return out if out != key else key + "x"


def _mutate(data, draw) -> None:
    """One random mutation in place: delete a key, replace a value with junk,
    insert a key, or misspell a key."""
    paths = list(_paths(data))
    op = draw(st.sampled_from(["delete", "replace", "insert", "misspell"]))
    if op == "insert":
        mappings = [()] + [p for p, _ in paths if isinstance(_parent(data, p + (None,)), dict)]
        target = _parent(data, draw(st.sampled_from(mappings)) + (None,))
        target[draw(KEYS)] = draw(JUNK)
        return
    if not paths:
        data[draw(KEYS)] = draw(JUNK)
        return
    path, is_key = draw(st.sampled_from(paths))
    parent = _parent(data, path)
    if op == "replace" or not is_key:
        parent[path[-1]] = draw(JUNK)
    elif op == "delete":
        del parent[path[-1]]
    else:
        parent[_misspell(draw, str(path[-1]))] = parent.pop(path[-1])


def _flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**9)
    text = text[:-len("\n...\n")] if text.endswith("\n...\n") else text
    return text.rstrip("\n")


def assert_exit_0_or_2(result) -> None:
    assert_clean_exit(result)
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    if result.exit_code == 0:
        assert result.stderr == ""
        assert result.stdout.startswith("config is valid: ")
    else:
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert lines
        for line in lines:
            assert line.startswith("error: "), line


@pytest.mark.parametrize("base", range(len(BASES)))
def test_every_valid_variation_used_as_a_property_base_is_valid(tmp_path, base):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASES[base]))
    result = invoke("config", "validate", "-c", str(path))
    assert result.exit_code == 0, result.output


@PROPERTY
@given(data=st.data())
@pytest.mark.slow
def test_mutated_config_files_exit_0_or_2_with_error_lines_only(tmp_path_factory, data):
    cfg = json.loads(json.dumps(data.draw(st.sampled_from(BASES))))
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(cfg, data.draw)
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    assert_exit_0_or_2(invoke("config", "validate", "-c", str(path)))


@PROPERTY
@given(data=st.data())
@pytest.mark.slow
def test_mutations_given_as_set_overrides_exit_0_or_2_with_error_lines_only(data):
    base = data.draw(st.sampled_from(BASES))
    keyed = [p for p, is_key in _paths(base) if is_key]
    overrides = []
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(keyed))
        dotted = ".".join(map(str, path))
        op = data.draw(st.sampled_from(["delete", "replace", "insert", "misspell"]))
        if op == "delete":
            overrides.append(f"{dotted}=null")
        elif op == "replace":
            overrides.append(f"{dotted}={_flow(data.draw(JUNK))}")
        elif op == "insert":
            overrides.append(f"{dotted}.{data.draw(KEYS)}={_flow(data.draw(JUNK))}")
        else:
            wrong = ".".join([*map(str, path[:-1]), _misspell(data.draw, str(path[-1]))])
            overrides += [f"{dotted}=null", f"{wrong}={_flow(_parent(base, path)[path[-1]])}"]
    result = invoke("config", "validate", *[f"--set={o}" for o in overrides])
    assert_exit_0_or_2(result)


@PROPERTY
@given(overrides=st.lists(st.one_of(TEXT, st.builds("{}={}".format, TEXT, TEXT),
                                    st.builds("{}={}".format, st.sampled_from(["train.steps", "roles.rollout.mesh",
                                                                               "roles", "placement.options", "train"]), TEXT)),
                          min_size=1, max_size=3))
@pytest.mark.slow
def test_arbitrary_set_strings_exit_0_or_2_with_error_lines_only(overrides):
    result = invoke("config", "validate", *[f"--set={o}" for o in overrides])
    assert_exit_0_or_2(result)


@PROPERTY
@given(data=st.data())
def test_build_config_either_succeeds_or_raises_config_error_with_one_line_problems(registry, data):
    cfg = json.loads(json.dumps(data.draw(st.sampled_from(BASES))))
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(cfg, data.draw)
    try:
        result = build_config(cfg, registry)
    except ConfigError as exc:
        assert exc.problems
        for p in exc.problems:
            assert p.path and p.message
            assert len(str(p).splitlines()) == 1, str(p)
    else:
        assert isinstance(result, RunConfig)
        # A config that loads is one that `config show` can print and load back.
        assert build_config(yaml.safe_load(yaml.safe_dump(result.to_dict())), registry) == result


def test_config_show_of_a_config_without_a_default_role_loads_back_without_it(tmp_path):
    from click.testing import CliRunner

    from rlpipe.cli.main import cli

    # no KL term, so the algorithm does not add the reference back (test_the_algorithm_adds_back_...)
    for fmt in ([], ["--json"]):
        shown = CliRunner().invoke(cli, ["config", "show", "--set", "roles.reference=null", "--set", "algorithm.options.kl_beta=0", *fmt])
        assert shown.exit_code == 0
        path = tmp_path / "shown.yaml"
        path.write_text(shown.stdout)
        again = CliRunner().invoke(cli, ["config", "validate", "-c", str(path)])
        assert again.exit_code == 0, again.stderr
        assert again.stdout == "config is valid: roles rollout, reward, trainer; placement policy default\n"
