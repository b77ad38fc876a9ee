"""Roles are wired by what they can do, never by their names (issue 16, item 2).

* no built-in role name is a string literal in the driver, the core, the CLI
  or the placement policies (except the config defaults listed below);
* a third-party role that replaces ``rollout`` under another name receives the
  trainer's weights after every update, shows in the trace and in the report,
  and ``rlpipe eval`` finds both the generating and the training role;
* the plugin checks report what pluggy would silently drop.
"""

from __future__ import annotations

import ast
import json
import sys
import types
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner

import rlpipe
from rlpipe.cli.main import cli
from rlpipe.core.errors import GraphError
from rlpipe.core.graph import build_graph
from rlpipe.core.placement import PlanContext
from rlpipe.core.plugins import load_registry
from rlpipe.core.specs import RoleSpec
from rlpipe.core.stage import WeightPublisher, WeightReceiver, weight_publisher
from rlpipe.testing import register_plugin

#: End to end: every test here trains, resumes or runs processes (`-m "not slow"` skips them).
pytestmark = pytest.mark.slow

ROOT = Path(rlpipe.__file__).parent
BUILTIN_ROLES = {"rollout", "trainer", "reference", "critic", "reward"}

#: Where a built-in role name may stay a string literal: config default values only.
ALLOWED = {
    # ``placement.options.groups`` of the disaggregated policy defaults to a
    # rollout half and a trainer half: a default value of its config section,
    # which a user replaces by naming their own roles.
    ("plugins/placement/disaggregated.py", "rollout"),
    ("plugins/placement/disaggregated.py", "trainer"),
}


def _checked_files() -> list[Path]:
    return [ROOT / "app" / "driver.py", *sorted((ROOT / "core").rglob("*.py")), *sorted((ROOT / "cli").rglob("*.py")),
            *sorted((ROOT / "plugins" / "placement").rglob("*.py"))]


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def role_name_literals(path: Path) -> list[tuple[int, str]]:
    """``(line, name)`` of every string constant equal to a built-in role name,
    docstrings left out (comments are not in the tree)."""
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in BUILTIN_ROLES and id(node) not in docs]


def test_no_builtin_role_name_is_a_string_literal_in_driver_core_cli_or_placement():
    found = []
    for path in _checked_files():
        rel = path.relative_to(ROOT).as_posix()
        found += [f"rlpipe/{rel}:{line}: {name!r}" for line, name in role_name_literals(path) if (rel, name) not in ALLOWED]
    assert found == [], "wire roles by capability, not by name:\n" + "\n".join(found)


def test_the_scan_finds_a_role_name_literal(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('"""The rollout: a docstring is fine."""\n# "trainer" in a comment is fine\nx = stages.get("rollout")\n')
    assert role_name_literals(probe) == [(3, "rollout")]


# -- the protocols --------------------------------------------------------------------------


def test_weight_protocols_are_runtime_checkable_and_the_builtins_have_them():
    from rlpipe.roles.rollout_stage import RolloutStage
    from rlpipe.roles.trainer_stage import TrainerStage

    assert rlpipe.WeightReceiver is WeightReceiver and rlpipe.WeightPublisher is WeightPublisher
    assert all(callable(getattr(RolloutStage, m, None)) for m in ("load_weights",))
    assert all(callable(getattr(TrainerStage, m, None)) for m in ("subscribe", "publish"))

    class Pub:
        def subscribe(self, callback): ...
        def publish(self): ...

    class Rec:
        def load_weights(self, state, version): ...

    pub, other, rec = Pub(), Pub(), Rec()
    assert isinstance(rec, WeightReceiver) and not isinstance(pub, WeightReceiver) and isinstance(pub, WeightPublisher)
    assert weight_publisher({"a": rec, "learner": pub}, "learner") is pub
    assert weight_publisher({"a": rec, "learner": pub}, None) is pub  # the only one
    assert weight_publisher({"a": rec}, "a") is None
    assert weight_publisher({"x": pub, "y": other, "s": rec}, "x") is pub
    with pytest.raises(ValueError, match="several roles publish weights"):
        weight_publisher({"x": pub, "y": other}, None)


def test_plan_context_heads_come_from_the_graph():
    assert PlanContext(edges=(("gen", "score"), ("gen", "learn"), ("score", "learn")), sink="learn").heads == ("gen",)
    assert PlanContext(edges=(("a", "c"), ("b", "c")), sink="c").heads == ("a", "b")
    assert PlanContext(edges=(), heads=("x",)).heads == ("x",)


def test_two_producers_suggest_dropping_the_builtin():
    def role(name, produces):
        return RoleSpec(name=name, description="", config_type=rlpipe.RoleConfig, consumes=set(), produces=set(produces))

    with pytest.raises(GraphError) as e:
        build_graph({"rollout": role("rollout", ["x", "y"]), "my_rollout": role("my_rollout", ["x", "y"])})
    expected = ("roles.my_rollout: produces fields 'x', 'y', which role 'rollout' already produces; a field has one "
                "producer: to replace 'rollout' with 'my_rollout', drop it with roles.rollout: null (--set roles.rollout=null)")
    assert [str(p) for p in e.value.problems] == [expected]


# -- hooks pluggy would silently drop ---------------------------------------------------------


def _module(tmp_path, monkeypatch, name: str, source: str) -> types.ModuleType:
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return __import__(name)


ROLE_HOOK = '''
from rlpipe import RoleConfig, RoleSpec

def rlpipe_roles():
    yield RoleSpec(name="{name}", description="", config_type=RoleConfig, consumes=set(), produces={{"{name}_x"}})
'''


def test_a_hook_defined_twice_in_one_module_is_reported_naming_the_module(tmp_path, monkeypatch):
    mod = _module(tmp_path, monkeypatch, "rp_twice", ROLE_HOOK.format(name="first") + ROLE_HOOK.format(name="second"))
    with register_plugin(mod, name="twice"):
        warnings: list[str] = []
        reg = load_registry(warn=warnings.append)
    info = next(p for p in reg.plugins if p.source.name == "twice")
    assert info.status == "failed"
    assert "first" not in reg.roles and "second" not in reg.roles
    [message] = [w for w in warnings if "twice" in w]
    assert "rp_twice" in message and "defines 'rlpipe_roles' 2 times (lines 4, 9 of" in message
    assert "only the last is a hook" in message


def test_two_hookimpls_of_one_hook_are_reported(tmp_path, monkeypatch):
    source = ROLE_HOOK.format(name="first") + '''
from rlpipe import hookimpl

@hookimpl(specname="rlpipe_roles")
def more_roles():
    return []
'''
    mod = _module(tmp_path, monkeypatch, "rp_two_impls", source)
    with register_plugin(mod, name="two-impls"):
        warnings: list[str] = []
        reg = load_registry(warn=warnings.append)
    assert next(p for p in reg.plugins if p.source.name == "two-impls").status == "failed"
    assert any("rp_two_impls" in w and "implements hook 'rlpipe_roles' twice (more_roles, rlpipe_roles)" in w
               for w in warnings), warnings


def test_a_hook_name_bound_to_a_list_is_reported(tmp_path, monkeypatch):
    mod = _module(tmp_path, monkeypatch, "rp_list", "rlpipe_roles = []\n")
    with register_plugin(mod, name="as-list"):
        warnings: list[str] = []
        load_registry(warn=warnings.append)
    assert any("has 'rlpipe_roles', which is not a function (list), so it implements no hook" in w for w in warnings), warnings


# -- a renamed rollout role, end to end ------------------------------------------------------------


RECEIVED: list[int] = []


class MyRollout:
    """What a plugin author writes: a stage wrapping the built-in generator
    that records every policy version it is given."""

    def __init__(self, inner):
        self.inner = inner

    def process(self, batch, *, context):
        return self.inner.process(batch, context=context)

    def on_barrier(self, *, context):
        self.inner.on_barrier(context=context)

    def offload(self):
        self.inner.offload()

    def onload(self):
        self.inner.onload()

    def load_weights(self, state, version):
        RECEIVED.append(version)
        self.inner.load_weights(state, version)

    @property
    def last_metrics(self):
        return self.inner.last_metrics


def _my_rollout_plugin() -> types.ModuleType:
    from rlpipe.roles.rollout import SPEC
    from rlpipe.roles.rollout_stage import RolloutStage, SingleTurn

    def factory(config, placement, *, context):
        return MyRollout(RolloutStage(config, placement, context=context, generator=SingleTurn))

    spec = attrs.evolve(SPEC, name="my_rollout", description="the built-in generator under another name",
                        factory=factory, configure=None)
    mod = types.ModuleType("rp_my_rollout")
    mod.rlpipe_roles = lambda: [spec]
    return mod


SMALL = ["--set", "train.prompts_per_item=2", "--set", "train.items_per_step=2", "--set", "roles.trainer.micro_batch_size=4",
         "--set", "roles.rollout=null", "--set", "roles.my_rollout={max_new_tokens: 4, num_generations: 2}"]


@pytest.fixture(scope="module")
def renamed_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("renamed") / "run"
    RECEIVED.clear()
    with register_plugin(_my_rollout_plugin(), name="my-rollout"):
        r = CliRunner().invoke(cli, ["train", "--steps", "3", "--run-dir", str(run_dir), "-q",
                                     *SMALL])
        assert r.exit_code == 0, r.stderr
        received = list(RECEIVED)
        ev = CliRunner().invoke(cli, ["eval", str(run_dir), "-n", "4", "-k", "0", "--json"])
        report = CliRunner().invoke(cli, ["report", str(run_dir), "--json"])
    return run_dir, received, ev, report


def test_a_renamed_rollout_receives_the_trainers_weights_after_every_update(renamed_run):
    run_dir, received, _, _ = renamed_run
    assert received == [1, 2, 3]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["policy_version"] for row in rows] == [1, 2, 3]
    assert all(row["reward/failures"] == 0 for row in rows)  # the reward role's failures, found by capability
    plan = json.loads((run_dir / "plan.json").read_text())
    assert {r["name"] for r in plan["roles"]} >= {"my_rollout", "trainer"} and "rollout" not in {r["name"] for r in plan["roles"]}


def test_a_renamed_rollout_has_its_own_track_in_the_trace_and_the_report(renamed_run):
    run_dir, _, _, report = renamed_run
    trace = json.loads((run_dir / "trace.json").read_text())
    track = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    spans = {(track[e["tid"]], e["name"]) for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {("my_rollout", "process"), ("my_rollout", "generate"), ("trainer", "weight_sync")} <= spans
    assert "rollout" not in track.values()
    assert report.exit_code == 0, report.stderr
    summary = json.loads(report.stdout)
    assert "my_rollout" in json.dumps(summary["timeline"])
    assert "my_rollout" in (run_dir / "report" / "report.md").read_text()


def test_eval_finds_the_generating_and_the_training_role_by_capability(renamed_run):
    _, _, ev, _ = renamed_run
    assert ev.exit_code == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["checkpoint_step"] == 2 and result["max_new_tokens"] == 4


def test_a_renamed_rollout_with_the_rollout_settings_sets_the_scoring_temperature():
    """Reference and trainer divide logits by the temperature the generating role
    sampled at, also when that role is a plugin reusing RolloutConfig under another name."""
    import types

    from rlpipe.roles.rollout import RolloutConfig, generating_section, sampling_temperature

    renamed = types.SimpleNamespace(roles={"my_rollout": RolloutConfig(temperature=0.7), "trainer": object()})
    assert generating_section(renamed).temperature == 0.7
    assert sampling_temperature(renamed) == 0.7
    assert sampling_temperature(types.SimpleNamespace(roles={"trainer": object()})) == 1.0
