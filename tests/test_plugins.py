"""The plugin registry: built-ins through rlpipe's own entry points, third-party
plugins found the same way (a fake installed distribution) or registered
in-process, and the manners the design asks for: a broken or conflicting
plugin is reported with its entry point, distribution and version, set aside,
and everything else keeps working; the config fails only when it selects what
the broken plugin would have provided.  Also RLPIPE_DISABLE_PLUGINS,
--no-plugins, RLPIPE_STRICT_PLUGINS and ``rlpipe plugins list [--json]``."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
import types
from importlib import metadata

import attrs
import numpy as np
import pytest
from click.testing import CliRunner

import rlpipe
from rlpipe import (
    Batch,
    ConfigError,
    Executor,
    PluginError,
    PolicySpec,
    RoleConfig,
    RoleSpec,
    build_graph,
    hookimpl,
)
from rlpipe.app.defaults import DEFAULT_CONFIG
from rlpipe.cli.main import cli
from rlpipe.core.plugins import load_registry
from rlpipe.runtime.run_config import load_config
from rlpipe.testing import RecordingStage, fake_distribution, register_plugin

#: What the design names; rlpipe may ship more.
DESIGN_ROLES = {"rollout", "reference", "trainer", "critic"}
DESIGN_POLICIES = {"default", "colocate-all", "disaggregated"}


# -- helpers ------------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_no_crash(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def plugins_json(*args: str) -> dict:
    """``rlpipe [args] plugins list --json`` as {entry-point name: entry}, plus its stderr."""
    result = invoke(*args, "plugins", "list", "--json")
    assert_no_crash(result)
    assert result.exit_code == 0, result.output
    return {e["name"]: e for e in json.loads(result.stdout)}, result.stderr


def load(**kwargs):
    """``load_registry`` collecting warnings instead of printing them."""
    warnings: list[str] = []
    reg = load_registry(warn=warnings.append, **kwargs)
    return reg, warnings


def builtin_roles() -> set[str]:
    return set(load_registry(no_plugins=True, warn=lambda m: None).roles)


def builtin_policies() -> set[str]:
    return set(load_registry(no_plugins=True, warn=lambda m: None).policies)


def by_name(reg, name):
    [info] = [p for p in reg.plugins if p.source.name == name]
    return info


@attrs.frozen(kw_only=True)
class JudgeConfig(RoleConfig):
    strictness: int = 1


def role(name: str, produces: str = "verdict", config_type: type = JudgeConfig, **kw) -> RoleSpec:
    return RoleSpec(name=name, description=f"the {name} role", config_type=config_type,
                    consumes={"completion_tokens"}, produces={produces}, **kw)


def plugin(modname: str, **hooks) -> types.ModuleType:
    """An in-process plugin module whose attributes are ``hooks``."""
    mod = types.ModuleType(modname)
    for attr, fn in hooks.items():
        setattr(mod, attr, fn)
    return mod


def role_module_source(role_name: str, produces: str = "verdict", *, decorated: bool = True, extra: str = "") -> str:
    """Source of a plugin module providing one role, for a fake distribution."""
    deco = "@hookimpl\n" if decorated else ""
    return textwrap.dedent("""\
        import attrs
        from rlpipe import RoleConfig, RoleSpec, hookimpl


        @attrs.frozen(kw_only=True)
        class Config(RoleConfig):
            level: int = 0


        {deco}def rlpipe_roles():
            yield RoleSpec(name={role!r}, description="third-party role", config_type=Config,
                           consumes={{"completion_tokens"}}, produces={{{produces!r}}})
        """).format(deco=deco, role=role_name, produces=produces) + textwrap.dedent(extra)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """Installs fake distributions: ``site(dist, version, {ep: module}, {module: source})``
    writes the modules and a ``.dist-info`` into a directory on ``sys.path``, so
    entry-point discovery finds them as after ``pip install``."""
    root = tmp_path / "site-packages"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    modules: list[str] = []

    def install(dist: str, version: str, entry_points: dict[str, str], sources: dict[str, str]) -> None:
        for mod, src in sources.items():
            (root / f"{mod}.py").write_text(src)
            modules.append(mod)
        fake_distribution(root, name=dist, version=version, entry_points=entry_points)
        importlib.invalidate_caches()

    yield install
    for mod in modules:
        sys.modules.pop(mod, None)


@pytest.fixture
def broken(site):
    """An installed plugin whose module fails to import, next to a working one."""
    site("broken-dist", "1.2.3", {"brk": "rp_broken_mod"}, {"rp_broken_mod": "raise ImportError('needs libfoo')\n"})
    site("good-dist", "0.5", {"good": "rp_good_mod"}, {"rp_good_mod": role_module_source("judge")})


# -- built-ins -----------------------------------------------------------------------------


def test_builtins_are_registered_through_rlpipes_own_entry_points(registry):
    eps = {ep.name: ep for ep in metadata.entry_points(group="rlpipe")}
    assert eps["roles"].value == "rlpipe.roles" and eps["placement"].value == "rlpipe.plugins.placement"
    assert eps["rewards"].value == "rlpipe.plugins.rewards" and eps["algorithms"].value == "rlpipe.plugins.algorithms"
    assert eps["roles"].dist.metadata["Name"] == "rlpipe"
    builtins = {p.source.name: p for p in registry.plugins if p.source.builtin}
    assert set(builtins) == {"roles", "placement", "engines", "rewards", "algorithms", "tasks", "environments", "tools"}
    for info in builtins.values():
        assert info.status == "active" and info.errors == []
        assert (info.source.distribution, info.source.version) == ("rlpipe", rlpipe.__version__)
    assert DESIGN_ROLES <= set(registry.roles) and DESIGN_POLICIES <= set(registry.policies)
    for item in registry.provided("rlpipe_roles").values():
        assert (item.plugin.source.name, item.plugin.source.distribution) == ("roles", "rlpipe")
    for item in registry.provided("rlpipe_placement_policies").values():
        assert (item.plugin.source.name, item.plugin.source.distribution) == ("placement", "rlpipe")
    builtin_kinds = {"rlpipe_rollout_engines": ("engines", {"jax"}),
                     "rlpipe_reward_functions": ("rewards", {"exact-match", "partial-match", "math-answer"}),
                     "rlpipe_algorithms": ("algorithms", {"grpo", "drgrpo", "dapo", "rloo", "reinforce-pp", "ppo", "gspo"}),
                     "rlpipe_environments": ("environments", {"tool", "single-turn"}),
                     "rlpipe_tools": ("tools", {"calculator"}),
                     "rlpipe_tool_parsers": ("tools", {"tag", "gsm8k", "hermes"})}
    for hook, (plugin, names) in builtin_kinds.items():
        provided = registry.provided(hook)
        assert names <= set(provided), hook
        assert {provided[n].plugin.source.name for n in names} == {plugin}


def test_clean_install_loads_without_warnings():
    reg, warnings = load()
    assert warnings == []
    assert all(p.status == "active" for p in reg.plugins)


def test_plugins_list_json_describes_each_plugin():
    entries, stderr = plugins_json()
    assert stderr == ""
    roles = entries["roles"]
    provides = roles.pop("provides")
    assert roles == {
        "name": "roles", "value": "rlpipe.roles", "distribution": "rlpipe", "version": rlpipe.__version__,
        "builtin": True, "status": "active", "errors": [],
    }
    assert {p["kind"] for p in provides} == {"role"} and DESIGN_ROLES <= {p["name"] for p in provides}
    assert DESIGN_POLICIES <= {p["name"] for p in entries["placement"]["provides"]}
    assert {p["kind"] for p in entries["placement"]["provides"]} == {"placement policy"}


def test_plugins_list_table_shows_name_status_distribution_and_version():
    result = invoke("plugins", "list")
    assert result.exit_code == 0 and result.stderr == ""
    header, rule, *rows = result.stdout.splitlines()
    assert header.split() == ["PLUGIN", "STATUS", "DISTRIBUTION", "VERSION", "PROVIDES"]
    assert set(rule) <= {"-", " "}
    row = next(r for r in rows if r.startswith("roles "))
    assert row.split()[:4] == ["roles", "active", "rlpipe", rlpipe.__version__]
    assert "role: rollout, reward" in row


# -- third-party plugins that work ---------------------------------------------------------


def test_installed_plugin_role_is_discovered_and_selectable(site):
    site("judge-dist", "2.0", {"judge": "rp_judge_mod"}, {"rp_judge_mod": role_module_source("judge")})
    reg, warnings = load()
    assert warnings == []
    item = reg.provided("rlpipe_roles")["judge"]
    assert (item.plugin.source.name, item.plugin.source.distribution, item.plugin.source.version) == ("judge", "judge-dist", "2.0")
    assert not item.plugin.source.builtin
    result = invoke("config", "validate", "--set", "roles.judge={level: 3}")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("config is valid: roles ") and "judge" in result.stdout


def test_in_process_plugin_is_visible_only_inside_register_plugin():
    mod = plugin("rp_inproc", rlpipe_roles=hookimpl(lambda: [role("judge")]))
    with register_plugin(mod, name="inproc", distribution="inproc-dist", version="9.9"):
        reg, warnings = load()
        assert warnings == [] and "judge" in reg.roles
        info = by_name(reg, "inproc")
        assert (info.source.distribution, info.source.version, info.status) == ("inproc-dist", "9.9", "active")
        assert info.provides == [("rlpipe_roles", "judge")]
        cfg = load_config(reg, defaults=DEFAULT_CONFIG, overrides=["roles.judge={strictness: 2}"])
        assert isinstance(cfg.roles["judge"], JudgeConfig) and cfg.roles["judge"].strictness == 2
    reg, _ = load()
    assert "judge" not in reg.roles and all(p.source.name != "inproc" for p in reg.plugins)


def test_undecorated_rlpipe_function_is_still_picked_up_from_an_installed_module(site):
    site("plain-dist", "1.0", {"plain": "rp_plain_mod"}, {"rp_plain_mod": role_module_source("judge", decorated=False)})
    reg, warnings = load()
    assert warnings == []
    assert reg.provided("rlpipe_roles")["judge"].plugin.source.name == "plain"


def test_undecorated_rlpipe_function_is_still_picked_up_in_process():
    def rlpipe_roles():
        return [role("judge")]

    with register_plugin(plugin("rp_plain", rlpipe_roles=rlpipe_roles), name="plain"):
        reg, warnings = load()
    assert warnings == [] and "judge" in reg.roles


def test_non_hook_attributes_of_a_plugin_are_ignored():
    mod = plugin("rp_misc", rlpipe_roles=lambda: [role("judge")], helper=lambda x: x, RLPIPE_LIMIT=3, rlpipe_version="1")
    with register_plugin(mod, name="misc"):
        reg, warnings = load()
    assert warnings == [] and by_name(reg, "misc").status == "active"


# -- a plugin that fails to import ---------------------------------------------------------


def test_plugin_that_fails_to_import_is_reported_and_the_rest_keeps_working(broken):
    reg, warnings = load()
    info = by_name(reg, "brk")
    assert info.status == "failed"
    assert info.errors == ["failed to import: ImportError: needs libfoo"]
    assert info.provides == []
    assert warnings == ["plugin 'brk' (rp_broken_mod; broken-dist 1.2.3) failed to import: ImportError: needs libfoo"]
    assert "judge" in reg.roles and builtin_roles() <= set(reg.roles)
    assert by_name(reg, "good").status == "active"


def test_failed_import_warns_on_stderr_naming_entry_point_distribution_and_version(broken):
    entries, stderr = plugins_json()
    [line] = stderr.splitlines()
    assert line.startswith("rlpipe: warning: plugin 'brk' ")
    assert "broken-dist 1.2.3" in line and "ImportError: needs libfoo" in line
    assert entries["brk"]["status"] == "failed"
    assert (entries["brk"]["distribution"], entries["brk"]["version"]) == ("broken-dist", "1.2.3")
    assert entries["good"]["status"] == "active"
    # Commands still work; the warning goes to stderr, never into the data on stdout.
    result = invoke("config", "validate", "--set", "roles.judge={}")
    assert result.exit_code == 0, result.output
    assert "rlpipe: warning:" not in result.stdout and "brk" in result.stderr


def test_plugins_list_table_shows_the_failure(broken):
    result = invoke("plugins", "list")
    assert result.exit_code == 0
    row = next(r for r in result.stdout.splitlines() if r.startswith("brk "))
    assert row.split()[:4] == ["brk", "failed", "broken-dist", "1.2.3"]
    assert "brk: failed to import: ImportError: needs libfoo" in result.stdout.splitlines()


@pytest.mark.parametrize("source, reason", [
    ("def broken(:\n", "failed to import: SyntaxError"),
    ("import sys\nsys.exit(3)\n", "failed to import: SystemExit: 3"),
    ("import rp_module_that_does_not_exist\n", "failed to import: ModuleNotFoundError"),
])
def test_any_import_failure_is_contained(site, source, reason):
    site("bad-dist", "0.1", {"bad": "rp_bad_mod"}, {"rp_bad_mod": source})
    reg, warnings = load()
    assert by_name(reg, "bad").status == "failed"
    assert by_name(reg, "bad").errors[0].startswith(reason)
    assert len(warnings) == 1 and set(reg.roles) == builtin_roles()


def test_entry_point_naming_a_missing_attribute_fails_cleanly(site):
    site("attr-dist", "0.1", {"attr": "rp_attr_mod:nothing_here"}, {"rp_attr_mod": "x = 1\n"})
    reg, _ = load()
    assert by_name(reg, "attr").status == "failed"
    assert by_name(reg, "attr").errors[0].startswith("failed to import: AttributeError")


def test_selecting_a_role_a_failed_plugin_might_provide_names_that_plugin(broken, registry):
    reg, _ = load()
    with pytest.raises(ConfigError) as info:
        load_config(reg, defaults=DEFAULT_CONFIG, overrides=["roles.verifier={}"])
    [problem] = info.value.problems
    assert problem.path == "roles.verifier"
    assert problem.message.startswith("unknown role 'verifier'")
    assert "it may be provided by plugin 'brk' (rp_broken_mod; broken-dist 1.2.3) failed to load" in problem.message
    assert "needs libfoo" in problem.message
    # Through the CLI: one error line, exit 2.
    result = invoke("config", "validate", "--set", "roles.verifier={}")
    assert_no_crash(result)
    assert result.exit_code == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "plugin 'brk'" in errors[0] and errors[0].startswith("error: roles.verifier: unknown role")


def test_selecting_a_policy_a_failed_plugin_might_provide_names_that_plugin(broken):
    result = invoke("config", "validate", "--set", "placement.policy=everywhere")
    assert result.exit_code == 2
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: placement.policy: unknown placement policy 'everywhere'")
    assert "plugin 'brk'" in error


def test_config_that_does_not_need_the_failed_plugin_is_valid(broken):
    result = invoke("config", "validate")
    assert result.exit_code == 0, result.output
    assert result.stdout == "config is valid: roles rollout, reward, reference, trainer; placement policy default\n"


# -- hooks that are wrong ---------------------------------------------------------------------


def test_unknown_hook_is_reported_with_a_suggestion():
    mod = plugin("rp_typo", rlpipe_rolez=hookimpl(lambda: [role("judge")]))
    with register_plugin(mod, name="typo", distribution="typo-dist", version="0.3"):
        reg, warnings = load()
    info = by_name(reg, "typo")
    assert info.status == "failed"
    assert info.errors == ["implements unknown hook 'rlpipe_rolez' (did you mean 'rlpipe_roles'?)"]
    assert warnings == ["plugin 'typo' (rp_typo; typo-dist 0.3) implements unknown hook 'rlpipe_rolez' (did you mean 'rlpipe_roles'?)"]
    assert set(reg.roles) == builtin_roles()


def test_unknown_hook_in_an_otherwise_good_plugin_sets_the_whole_plugin_aside():
    mod = plugin("rp_half", rlpipe_roles=lambda: [role("judge")], rlpipe_on_stage_eror=lambda role, error, context: None)
    with register_plugin(mod, name="half"):
        reg, _ = load()
    assert by_name(reg, "half").status == "failed"
    assert "did you mean 'rlpipe_on_stage_error'?" in by_name(reg, "half").errors[0]
    assert "judge" not in reg.roles


def test_registration_hookimpl_with_an_argument_its_spec_lacks():
    def rlpipe_roles(config):
        return [role("judge")]

    with register_plugin(plugin("rp_args", rlpipe_roles=rlpipe_roles), name="args"):
        reg, warnings = load()
    info = by_name(reg, "args")
    assert info.status == "failed" and "judge" not in reg.roles
    assert info.errors == ["hook 'rlpipe_roles' asks for argument(s) 'config' that the hookspec does not pass (it passes: no arguments)"]
    assert len(warnings) == 1 and "'args'" in warnings[0]


def test_lifecycle_hookimpl_with_an_argument_its_spec_lacks():
    def rlpipe_before_stage(role, batch, context, step):
        pass

    with register_plugin(plugin("rp_args2", rlpipe_before_stage=rlpipe_before_stage), name="args2"):
        reg, _ = load()
    [error] = by_name(reg, "args2").errors
    assert error == ("hook 'rlpipe_before_stage' asks for argument(s) 'step' that the hookspec does not pass "
                     "(it passes: role, batch, context)")


def test_hookimpl_using_a_subset_of_the_spec_arguments_is_fine():
    with register_plugin(plugin("rp_subset", rlpipe_after_stage=lambda role: None), name="subset"):
        reg, warnings = load()
    assert warnings == [] and by_name(reg, "subset").status == "active"


def test_registration_hook_that_raises_sets_the_plugin_aside():
    def rlpipe_placement_policies():
        raise RuntimeError("no GPU found")

    mod = plugin("rp_raise", rlpipe_roles=lambda: [role("judge")], rlpipe_placement_policies=rlpipe_placement_policies)
    with register_plugin(mod, name="raiser", distribution="raise-dist", version="1.0"):
        reg, warnings = load()
    info = by_name(reg, "raiser")
    assert info.status == "failed"
    assert info.errors == ["hook 'rlpipe_placement_policies' raised RuntimeError: no GPU found"]
    assert warnings == ["plugin 'raiser' (rp_raise; raise-dist 1.0) hook 'rlpipe_placement_policies' raised RuntimeError: no GPU found"]
    assert "judge" not in reg.roles  # a failed plugin provides nothing, not even what its other hooks returned
    assert set(reg.roles) == builtin_roles() and set(reg.policies) == builtin_policies()


def test_registration_generator_that_raises_midway_provides_nothing():
    def rlpipe_roles():
        yield role("judge")
        raise ValueError("second role is broken")

    with register_plugin(plugin("rp_gen", rlpipe_roles=rlpipe_roles), name="gen"):
        reg, _ = load()
    assert by_name(reg, "gen").errors == ["hook 'rlpipe_roles' raised ValueError: second role is broken"]
    assert "judge" not in reg.roles


@pytest.mark.parametrize("record, expected", [
    (PolicySpec(name="judge", description="x", factory=lambda options: None), "yielded PolicySpec, expected RoleSpec"),
    ({"name": "judge"}, "yielded dict, expected RoleSpec"),
    ("judge", "yielded str, expected RoleSpec"),
])
def test_hook_yielding_the_wrong_record_type(record, expected):
    with register_plugin(plugin("rp_wrong", rlpipe_roles=lambda: [role("other"), record]), name="wrong"):
        reg, warnings = load()
    info = by_name(reg, "wrong")
    assert info.status == "failed"
    assert info.errors == [f"hook 'rlpipe_roles' {expected}"]
    assert "other" not in reg.roles and "judge" not in reg.roles
    assert len(warnings) == 1


@attrs.frozen(kw_only=True)
class PlainAttrsConfig:
    level: int = 0


@pytest.mark.parametrize("config_type", [
    PlainAttrsConfig,
    dict,
    None,
], ids=["attrs-class-not-RoleConfig", "not-attrs", "none"])
def test_role_whose_config_type_is_not_a_roleconfig_subclass(config_type):
    spec = RoleSpec(name="judge", description="x", config_type=config_type, produces={"verdict"})
    with register_plugin(plugin("rp_cfg", rlpipe_roles=lambda: [spec]), name="cfg"):
        reg, _ = load()
    info = by_name(reg, "cfg")
    assert info.status == "failed"
    assert info.errors == ["role 'judge': config_type must be an attrs class deriving from rlpipe.RoleConfig"]
    assert "judge" not in reg.roles


# -- name conflicts -------------------------------------------------------------------------


def test_third_party_plugin_claiming_a_builtin_role_name_leaves_it_with_the_builtin():
    impostor = role("rollout", produces="fake_completions")
    with register_plugin(plugin("rp_imp", rlpipe_roles=lambda: [impostor, role("judge")]), name="imp",
                         distribution="imp-dist", version="6.6"):
        reg, warnings = load()
        entries, stderr = plugins_json()
    owner = reg.provided("rlpipe_roles")["rollout"]
    assert (owner.plugin.source.name, owner.plugin.source.distribution) == ("roles", "rlpipe")
    assert reg.roles["rollout"] is not impostor
    info = by_name(reg, "imp")
    assert info.status == "conflict"
    assert info.errors == ["claims role 'rollout', which rlpipe's built-in 'roles' owns; ignored"]
    assert warnings == ["plugin 'imp' (rp_imp; imp-dist 6.6) claims role 'rollout', which rlpipe's built-in 'roles' owns; ignored"]
    # The plugin's other names are still its own.
    assert reg.provided("rlpipe_roles")["judge"].plugin is info
    assert entries["imp"]["status"] == "conflict" and entries["roles"]["status"] == "active"
    assert "claims role 'rollout'" in stderr


def test_third_party_plugin_claiming_a_builtin_policy_name_leaves_it_with_the_builtin(site):
    site("pol-dist", "1.0", {"pol": "rp_pol_mod"}, {"rp_pol_mod": textwrap.dedent("""\
        from rlpipe import PolicySpec

        def rlpipe_placement_policies():
            return [PolicySpec(name="default", description="mine", factory=lambda options: None)]
        """)})
    reg, warnings = load()
    assert reg.provided("rlpipe_placement_policies")["default"].plugin.source.distribution == "rlpipe"
    assert by_name(reg, "pol").status == "conflict"
    assert warnings == ["plugin 'pol' (rp_pol_mod; pol-dist 1.0) claims placement policy 'default', "
                        "which rlpipe's built-in 'placement' owns; ignored"]


@pytest.fixture
def two_judges(site):
    site("judge-a", "1.0", {"judge_a": "rp_judge_a"}, {"rp_judge_a": role_module_source("judge", "verdict_a")})
    site("judge-b", "2.0", {"judge_b": "rp_judge_b"}, {"rp_judge_b": role_module_source("judge", "verdict_b")})


def test_two_third_party_plugins_claiming_one_role_use_neither(two_judges):
    reg, warnings = load()
    assert "judge" not in reg.roles
    assert [p.source.name for p in reg.ambiguous("rlpipe_roles")["judge"]] == ["judge_a", "judge_b"]
    assert by_name(reg, "judge_a").status == by_name(reg, "judge_b").status == "conflict"
    assert len(warnings) == 2
    assert all("claims role 'judge', also claimed by" in w for w in warnings)
    entries, _ = plugins_json()
    assert entries["judge_a"]["status"] == entries["judge_b"]["status"] == "conflict"


def test_selecting_a_role_claimed_by_two_plugins_is_a_config_error_naming_both(two_judges):
    reg, _ = load()
    with pytest.raises(ConfigError) as info:
        load_config(reg, defaults=DEFAULT_CONFIG, overrides=["roles.judge={}"])
    [problem] = info.value.problems
    assert problem.path == "roles.judge"
    assert "plugin 'judge_a' (rp_judge_a; judge-a 1.0)" in problem.message
    assert "plugin 'judge_b' (rp_judge_b; judge-b 2.0)" in problem.message
    assert "neither is used" in problem.message and "RLPIPE_DISABLE_PLUGINS=" in problem.message

    result = invoke("config", "validate", "--set", "roles.judge={}")
    assert_no_crash(result)
    assert result.exit_code == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith("error: roles.judge: role 'judge' is claimed by plugin 'judge_a'")
    assert "judge-a 1.0" in errors[0] and "judge-b 2.0" in errors[0]
    # Warnings are not errors: every other stderr line is a warning.
    assert all(line.startswith(("error: ", "rlpipe: warning: ")) for line in result.stderr.splitlines())


def test_disabling_one_of_two_claimants_gives_the_name_to_the_other(two_judges, monkeypatch):
    monkeypatch.setenv("RLPIPE_DISABLE_PLUGINS", "judge_b")
    reg, warnings = load()
    assert warnings == []
    assert reg.provided("rlpipe_roles")["judge"].plugin.source.name == "judge_a"
    assert invoke("config", "validate", "--set", "roles.judge={}").exit_code == 0


def test_config_not_selecting_the_contested_role_is_valid(two_judges):
    result = invoke("config", "validate")
    assert result.exit_code == 0, result.output


def test_plugin_providing_one_name_twice_is_a_conflict_and_the_first_is_used():
    first, second = role("judge", produces="a"), role("judge", produces="b")
    with register_plugin(plugin("rp_twice", rlpipe_roles=lambda: [first, second]), name="twice"):
        reg, _ = load()
    assert reg.roles["judge"] is first
    assert by_name(reg, "twice").status == "conflict"
    assert by_name(reg, "twice").errors == ["provides role 'judge' twice; the first is used"]


# -- disabling, --no-plugins, strict -----------------------------------------------------------


def test_disable_plugins_by_entry_point_name_and_by_distribution_name(site, monkeypatch):
    # Their modules would fail to import: "disabled" proves they were never imported.
    site("alpha-dist", "1.0", {"alpha": "rp_alpha"}, {"rp_alpha": "raise ImportError('imported alpha')\n"})
    site("Beta_Dist", "1.0", {"beta": "rp_beta"}, {"rp_beta": "raise ImportError('imported beta')\n"})
    site("gamma-dist", "1.0", {"gamma": "rp_gamma"}, {"rp_gamma": role_module_source("judge")})
    monkeypatch.setenv("RLPIPE_DISABLE_PLUGINS", "alpha, beta-dist")  # distribution names compare normalised
    reg, warnings = load()
    assert by_name(reg, "alpha").status == "disabled"
    assert by_name(reg, "beta").status == "disabled"
    assert by_name(reg, "gamma").status == "active" and "judge" in reg.roles
    assert warnings == [] and "rp_alpha" not in sys.modules
    entries, stderr = plugins_json()
    assert (entries["alpha"]["status"], entries["beta"]["status"], entries["gamma"]["status"]) == ("disabled", "disabled", "active")
    assert stderr == ""


def test_disable_plugins_applies_to_in_process_plugins_and_never_to_builtins(monkeypatch):
    monkeypatch.setenv("RLPIPE_DISABLE_PLUGINS", "inproc,roles,rlpipe")
    with register_plugin(plugin("rp_dis", rlpipe_roles=lambda: [role("judge")]), name="inproc"):
        reg, _ = load()
    assert by_name(reg, "inproc").status == "disabled" and "judge" not in reg.roles
    assert set(reg.roles) == builtin_roles() and by_name(reg, "roles").status == "active"


def test_selecting_a_role_while_plugins_are_disabled_mentions_the_disabled_plugin(site, monkeypatch):
    site("judge-dist", "2.0", {"judge": "rp_judge_mod"}, {"rp_judge_mod": role_module_source("judge")})
    monkeypatch.setenv("RLPIPE_DISABLE_PLUGINS", "judge-dist")
    result = invoke("config", "validate", "--set", "roles.judge={}")
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: roles.judge: unknown role 'judge'")
    assert "plugin 'judge' (rp_judge_mod; judge-dist 2.0) disabled" in line


def test_no_plugins_flag_loads_builtins_only(broken, site):
    entries, stderr = plugins_json("--no-plugins")
    assert stderr == ""  # the broken plugin is not even imported, so nothing to warn about
    assert entries["brk"]["status"] == entries["good"]["status"] == "disabled"
    assert entries["roles"]["status"] == entries["placement"]["status"] == "active"
    result = invoke("--no-plugins", "config", "validate", "--set", "roles.judge={}")
    assert result.exit_code == 2 and result.stderr.startswith("error: roles.judge: unknown role 'judge'")
    assert invoke("--no-plugins", "config", "validate").exit_code == 0
    reg, warnings = load(no_plugins=True)
    assert set(reg.roles) == builtin_roles() and warnings == []


def test_no_plugins_flag_also_covers_in_process_plugins():
    with register_plugin(plugin("rp_np", rlpipe_roles=lambda: [role("judge")]), name="np"):
        entries, _ = plugins_json("--no-plugins")
        assert entries["np"]["status"] == "disabled"
        entries, _ = plugins_json()
        assert entries["np"]["status"] == "active"


def test_strict_plugins_turns_a_failed_import_into_a_plugin_error(broken, monkeypatch):
    monkeypatch.setenv("RLPIPE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError) as info:
        load_registry(warn=lambda m: None)
    assert "RLPIPE_STRICT_PLUGINS" in str(info.value)
    assert "plugin 'brk' (rp_broken_mod; broken-dist 1.2.3) failed to import: ImportError: needs libfoo" in str(info.value)


@pytest.mark.parametrize("command", [["config", "validate"], ["plugins", "list"], ["config", "show", "--json"]])
def test_strict_plugins_makes_the_cli_exit_2_with_error_lines(broken, monkeypatch, command):
    monkeypatch.setenv("RLPIPE_STRICT_PLUGINS", "1")
    result = invoke(*command)
    assert_no_crash(result)
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "error: plugin problems (RLPIPE_STRICT_PLUGINS is set):"
    assert all(line.startswith("error: ") for line in lines)
    assert any("plugin 'brk'" in line and "broken-dist 1.2.3" in line for line in lines)


def test_strict_plugins_turns_a_name_conflict_into_an_error(two_judges, monkeypatch):
    monkeypatch.setenv("RLPIPE_STRICT_PLUGINS", "1")
    result = invoke("config", "validate")
    assert result.exit_code == 2 and "claims role 'judge'" in result.stderr


@pytest.mark.parametrize("value, strict", [("1", True), ("true", True), ("0", False), ("", False)])
def test_strict_plugins_follows_the_environment_variable(broken, monkeypatch, value, strict):
    monkeypatch.setenv("RLPIPE_STRICT_PLUGINS", value)
    result = invoke("config", "validate")
    assert result.exit_code == (2 if strict else 0), result.output


def test_strict_plugins_with_healthy_plugins_is_silent(site, monkeypatch):
    site("judge-dist", "2.0", {"judge": "rp_judge_mod"}, {"rp_judge_mod": role_module_source("judge")})
    monkeypatch.setenv("RLPIPE_STRICT_PLUGINS", "1")
    reg, warnings = load()
    assert "judge" in reg.roles and warnings == []


def test_strict_plugins_ignores_disabled_plugins(broken, monkeypatch):
    monkeypatch.setenv("RLPIPE_STRICT_PLUGINS", "1")
    monkeypatch.setenv("RLPIPE_DISABLE_PLUGINS", "broken-dist")
    reg, warnings = load()
    assert by_name(reg, "brk").status == "disabled" and warnings == []


# -- lifecycle hooks ---------------------------------------------------------------------------


def _run_one_stage(reg) -> None:
    spec = RoleSpec(name="echo", description="echo", config_type=RoleConfig, consumes={"prompt_tokens"},
                    produces={"echo"}, sink=True)
    stage = RecordingStage("echo", {"echo": lambda batch, ctx: batch["prompt_tokens"] + 1})
    batches = [[Batch(prompt_tokens=np.zeros((1, 2)), prompt_mask=np.ones((1, 2)))]]
    Executor(build_graph({"echo": spec}), {"echo": stage}, hooks=reg.hook).run(batches, steps=1)


def test_lifecycle_hooks_of_a_failed_plugin_are_not_called():
    calls: list[tuple[str, str, bool]] = []

    def observer(tag):
        return dict(
            rlpipe_before_stage=lambda role, batch: calls.append((tag, "before", batch is None)),
            rlpipe_after_stage=lambda role, batch: calls.append((tag, "after", batch is None)),
        )

    def boom():
        raise RuntimeError("registration fails")

    good = plugin("rp_obs_good", **observer("good"))
    raising = plugin("rp_obs_raise", rlpipe_roles=boom, **observer("raising"))
    wrong = plugin("rp_obs_wrong", rlpipe_roles=lambda: ["not a RoleSpec"], **observer("wrong"))
    with register_plugin(good, name="good"), register_plugin(raising, name="raising"), register_plugin(wrong, name="wrong"):
        reg, _ = load()
        assert [by_name(reg, n).status for n in ("good", "raising", "wrong")] == ["active", "failed", "failed"]
        _run_one_stage(reg)
    assert {tag for tag, _, _ in calls} == {"good"}
    # One item and one barrier: before and after each.
    assert sorted(calls) == sorted([("good", "before", False), ("good", "after", False),
                                    ("good", "before", True), ("good", "after", True)])


def test_lifecycle_hooks_of_an_installed_plugin_that_fails_to_import_are_not_called(site, tmp_path):
    marker = tmp_path / "called.txt"
    site("obs-dist", "1.0", {"obs": "rp_obs_mod"}, {"rp_obs_mod": textwrap.dedent(f"""\
        def rlpipe_before_stage(role):
            open({str(marker)!r}, "a").write(role + "\\n")

        raise ImportError("after defining the hook")
        """)})
    reg, _ = load()
    assert by_name(reg, "obs").status == "failed"
    _run_one_stage(reg)
    assert not marker.exists()


def test_failed_plugin_with_a_taken_name_does_not_unregister_the_plugin_that_has_it():
    calls = []
    first = plugin("rp_first", rlpipe_before_stage=lambda role: calls.append(("first", role)))
    second = plugin("rp_second", rlpipe_before_stage=lambda role: calls.append(("second", role)))
    with register_plugin(first, name="same"), register_plugin(second, name="same"):
        reg, warnings = load()
        assert [p.status for p in reg.plugins if p.source.name == "same"] == ["active", "failed"]
        assert "could not be registered" in warnings[0]
        _run_one_stage(reg)
    assert ("first", "echo") in calls and all(tag == "first" for tag, _ in calls)
