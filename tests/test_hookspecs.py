"""Every hookspec has a test here (test_hook_<name>) and is documented, with its
signature, in docs/plugins.md; every config key is documented in docs/config.md."""

import inspect
import threading
import types

import attrs
import numpy as np
import pytest
from helpers import ROOT, config, plan

from rlpipe import (
    AdvantageEstimatorSpec,
    AlgorithmSpec,
    Batch,
    EnvironmentSpec,
    Executor,
    PolicyLossSpec,
    PolicySpec,
    RewardFunctionSpec,
    RoleConfig,
    RoleSpec,
    RolloutEngineSpec,
    TaskSpec,
    ToolParserSpec,
    ToolSpec,
    build_graph,
    hookimpl,
)
from rlpipe.core import hookspecs
from rlpipe.core.config import PlacementConfig
from rlpipe.core.plugins import load_registry
from rlpipe.plugins.placement.colocate_all import ColocateAllPolicy
from rlpipe.plugins.placement.disaggregated import DeviceGroup, DisaggregatedOptions
from rlpipe.runtime.run_config import TrainConfig
from rlpipe.testing import RecordingStage, register_plugin

ALL_HOOKS = [*hookspecs.REGISTRATION_HOOKS, *hookspecs.LIFECYCLE_HOOKS]


def test_the_hook_lists_cover_every_hookspec():
    declared = {name for name, fn in vars(hookspecs).items()
                if inspect.isfunction(fn) and hasattr(fn, "rlpipe_spec")}
    assert declared == set(ALL_HOOKS)


def test_every_hookspec_has_a_test():
    missing = [h for h in ALL_HOOKS if f"test_hook_{h}" not in globals()]
    assert not missing, f"hookspecs without a test_hook_<name> in {__file__}: {missing}"


def test_every_hookspec_is_documented_with_its_signature():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    missing = [h for h in ALL_HOOKS if f"### `{hookspecs.hook_signature(h)}`" not in doc]
    assert not missing, f"not documented with their current signature in docs/plugins.md: {missing}"


def config_keys():
    """(dotted key, default) for every config key rlpipe itself defines."""
    from rlpipe.core.config import RoleConfig as Base
    from rlpipe.plugins.tasks import DigitTaskConfig, JsonlTaskConfig
    from rlpipe.runtime.run_config import AlgorithmSection, ModelConfig, TaskSection

    out = [(f"train.{f.name}", f.default) for f in attrs.fields(TrainConfig)]
    out += [(f"model.{f.name}", f.default) for f in attrs.fields(ModelConfig)]
    out += [(f"task.{f.name}", f.default) for f in attrs.fields(TaskSection)]
    out += [(f"task.options.{f.name}", f.default) for f in attrs.fields(DigitTaskConfig)]
    # a required key (no default) is documented with "— (required)"
    out += [(f"task.options.{f.name}", None if f.default is attrs.NOTHING else f.default)
            for f in attrs.fields(JsonlTaskConfig)]
    # algorithm.options.* are each algorithm's own, documented in docs/algorithms.md
    out += [(f"algorithm.{f.name}", f.default) for f in attrs.fields(AlgorithmSection)]
    out += [(f"placement.{f.name}", f.default) for f in attrs.fields(PlacementConfig)]
    out += [(f"roles.<role>.{f.name}", f.default) for f in attrs.fields(Base)]
    reg = load_registry(warn=lambda m: None)
    for name, spec in reg.roles.items():
        base = {f.name for f in attrs.fields(Base)}
        out += [(f"roles.{name}.{f.name}", f.default) for f in attrs.fields(spec.config_type) if f.name not in base]
    from rlpipe.plugins.agentic import EnvironmentSection
    from rlpipe.plugins.environments import SingleTurnOptions, ToolEnvironmentOptions
    from rlpipe.plugins.tasks import CalculatorTaskConfig

    out += [(f"task.options.{f.name}", f.default) for f in attrs.fields(CalculatorTaskConfig)]
    out += [(f"roles.rollout.environment.{f.name}", None if f.default is attrs.NOTHING else f.default)
            for f in attrs.fields(EnvironmentSection)]
    for options in (ToolEnvironmentOptions, SingleTurnOptions):
        out += [(f"roles.rollout.environment.options.{f.name}", f.default) for f in attrs.fields(options)]
    out += [(f"placement.options.{f.name}", None) for f in attrs.fields(DisaggregatedOptions)]
    out += [(f"placement.options.groups[i].{f.name}", None) for f in attrs.fields(DeviceGroup)]
    return out


@pytest.mark.parametrize(("key", "default"), config_keys())
def test_every_config_key_is_documented_with_its_default(key, default):
    doc = (ROOT / "docs" / "config.md").read_text()
    line = next((ln for ln in doc.splitlines() if ln.startswith(f"| `{key}` |")), None)
    assert line is not None, f"{key} is not in docs/config.md"
    if default is not None and not isinstance(default, attrs.Factory):
        shown = {True: "true", False: "false"}.get(default, default) if isinstance(default, bool) else default
        shown = list(shown) if isinstance(shown, tuple) else shown  # YAML shows tuples as lists
        assert f"`{shown}`" in line, f"{key}: default {shown!r} not in its docs row"


# -- registration hooks -------------------------------------------------------------------


def registry_with(name, **hooks):
    plugin = types.SimpleNamespace(**{h: hookimpl(fn) for h, fn in hooks.items()})
    with register_plugin(plugin, name=name, distribution=f"{name}-dist", version="1.2.3"):
        return load_registry(warn=lambda m: None)


def test_hook_rlpipe_roles():
    @attrs.frozen(kw_only=True)
    class EchoConfig(RoleConfig):
        pass

    spec = RoleSpec(name="echo", description="copies completions", config_type=EchoConfig,
                    consumes={"completion_tokens"}, produces={"echo"})
    reg = registry_with("echo", rlpipe_roles=lambda: [spec])
    assert reg.roles["echo"] is spec
    assert reg.provided("rlpipe_roles")["echo"].plugin.source.distribution == "echo-dist"
    p = plan(reg, {"roles": {"echo": {}}})
    assert ("rollout", "echo") in {(b.upstream, b.downstream) for b in p.boundaries}


def test_hook_rlpipe_placement_policies():
    spec = PolicySpec(name="everywhere", description="all on all", factory=lambda options: ColocateAllPolicy())
    reg = registry_with("everywhere", rlpipe_placement_policies=lambda: [spec])
    assert reg.policies["everywhere"] is spec
    assert plan(reg, {"placement": {"policy": "everywhere"}}).mode == "colocated"


@pytest.mark.parametrize(("hook", "record"), [
    ("rlpipe_algorithms", AlgorithmSpec(name="my-grpo", description="d", factory=object, roles=("rollout", "trainer"))),
    ("rlpipe_advantage_estimators", AdvantageEstimatorSpec(name="mean-baseline", description="d", fn=lambda r, **_: r - r.mean())),
    ("rlpipe_policy_losses", PolicyLossSpec(name="pg", description="d", fn=lambda logp, adv, mask, **_: -(logp * adv * mask).sum())),
    ("rlpipe_reward_functions", RewardFunctionSpec(name="short", description="d", fn=lambda p, c, e: 1.0 / (1 + len(c)))),
    ("rlpipe_tasks", TaskSpec(name="my-jsonl", description="d", factory=object)),
    ("rlpipe_rollout_engines", RolloutEngineSpec(name="my-server", description="d", factory=object)),
    ("rlpipe_environments", EnvironmentSpec(name="my-env", description="d", factory=object)),
    ("rlpipe_tools", ToolSpec(name="my-tool", description="d", fn=str)),
    ("rlpipe_tool_parsers", ToolParserSpec(name="my-format", description="d", factory=object)),
])
def test_registration_hook_records_are_filed_by_name(hook, record):
    reg = registry_with("kinds", **{hook: lambda: [record]})
    builtin = {n for n, p in reg.provided(hook).items() if p.plugin.source.builtin}
    assert {n: s for n, s in reg.specs(hook).items() if n not in builtin} == {record.name: record}
    info = next(p for p in reg.plugins if p.source.name == "kinds")
    kind = hookspecs.REGISTRATION_HOOKS[hook][0]
    assert info.to_json()["provides"] == [{"kind": kind, "name": record.name}]


def test_hook_rlpipe_algorithms():
    spec = AlgorithmSpec(name="ppo-lite", description="d", factory=object, roles=("rollout", "critic", "trainer"))
    assert registry_with("a", rlpipe_algorithms=lambda: [spec]).specs("rlpipe_algorithms")["ppo-lite"].roles == ("rollout", "critic", "trainer")


def test_hook_rlpipe_advantage_estimators():
    spec = AdvantageEstimatorSpec(name="mean-baseline", description="d", fn=lambda rewards, **_: rewards - rewards.mean())
    fn = registry_with("a", rlpipe_advantage_estimators=lambda: [spec]).specs("rlpipe_advantage_estimators")["mean-baseline"].fn
    np.testing.assert_allclose(fn(np.array([1.0, 3.0])), [-1.0, 1.0])


def test_hook_rlpipe_policy_losses():
    spec = PolicyLossSpec(name="pg", description="d", fn=lambda logp, adv, mask, **_: -(logp * adv * mask).sum())
    fn = registry_with("a", rlpipe_policy_losses=lambda: [spec]).specs("rlpipe_policy_losses")["pg"].fn
    assert fn(np.array([1.0, 2.0]), np.array([1.0, 1.0]), np.array([1.0, 0.0])) == -1.0


def test_hook_rlpipe_reward_functions():
    spec = RewardFunctionSpec(name="short", description="d", fn=lambda prompt, completion, example: 1.0 / (1 + len(completion)))
    fn = registry_with("a", rlpipe_reward_functions=lambda: [spec]).specs("rlpipe_reward_functions")["short"].fn
    assert fn("p", "abc", {}) == 0.25


def test_hook_rlpipe_tasks():
    spec = TaskSpec(name="my-jsonl", description="d", factory=dict, rewards=("short",))
    assert registry_with("a", rlpipe_tasks=lambda: [spec]).specs("rlpipe_tasks")["my-jsonl"].rewards == ("short",)


def test_hook_rlpipe_rollout_engines():
    spec = RolloutEngineSpec(name="my-server", description="d", factory=dict)
    assert "my-server" in registry_with("a", rlpipe_rollout_engines=lambda: [spec]).specs("rlpipe_rollout_engines")


class _Echo:
    max_turns = 2

    def reset(self, example):
        self.answer = example["answer"]
        return ""

    def step(self, action):
        if action.strip() == self.answer:
            return "", 1.0, True
        return f" (want {self.answer}) ", 0.0, False


def test_hook_rlpipe_environments():
    from rlpipe.plugins.agentic.environment import (
        EnvironmentSection,
        environment_options,
    )

    spec = EnvironmentSpec(name="echo", description="d", factory=lambda options, *, context: _Echo())
    reg = registry_with("env", rlpipe_environments=lambda: [spec])
    assert reg.specs("rlpipe_environments")["echo"] is spec
    found, options = environment_options(EnvironmentSection(name="echo"), reg)
    env = found.factory(options, context=None)
    env.reset({"answer": "4"})
    assert env.step("5") == (" (want 4) ", 0.0, False) and env.step("4") == ("", 1.0, True)
    p = plan(reg, {"roles": {"rollout": {"environment": {"name": "echo"}}}})
    assert ("rollout", "reward") in {(b.upstream, b.downstream) for b in p.boundaries}


def _tool_environment(reg, **options):
    from contextlib import nullcontext

    from rlpipe.plugins.environments import ToolEnvironment, ToolEnvironmentOptions

    ctx = types.SimpleNamespace(run_config=config(reg, {"task": {"name": "calculator", "options": None}}), registry=reg,
                                span=lambda name, **a: nullcontext())
    env = ToolEnvironment(ToolEnvironmentOptions(**options), context=ctx)
    env.reset({"prompt": "p", "answer": "ABC"})
    return env


def test_hook_rlpipe_tools():
    spec = ToolSpec(name="upper", description="upper-cases text",
                    parameters={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
                    fn=lambda arguments: arguments["text"].upper())
    reg = registry_with("t", rlpipe_tools=lambda: [spec])
    assert reg.specs("rlpipe_tools")["upper"] is spec
    env = _tool_environment(reg, tools=("upper",), parser="tag")
    assert env.step("<tool>upper: abc</tool>").observation == "<result>ABC</result>"


def test_hook_rlpipe_tool_parsers():
    import re

    from rlpipe.plugins.agentic import ToolCall

    class Bracket:
        def describe(self, tools):
            return "Tools: " + ", ".join(t.name for t in tools) + "\n"

        def parse(self, text):
            m = re.search(r"\[(\w+) (.*?)\]", text)
            return None if m is None else ToolCall(name=m[1], arguments=m[2], end=m.end())

        def format_call(self, name, arguments):
            return f"[{name} {next(iter(arguments.values()))}]"

        def format_result(self, text, *, error=False):
            return f"[{'error' if error else '='} {text}]"

    spec = ToolParserSpec(name="bracket", description="[tool args]", factory=Bracket)
    reg = registry_with("p", rlpipe_tool_parsers=lambda: [spec])
    assert reg.specs("rlpipe_tool_parsers")["bracket"] is spec
    env = _tool_environment(reg, tools=("calculator",), parser="bracket")
    assert env.reset({"prompt": "p", "answer": "84"}) == "Tools: calculator\n"
    assert env.step("[calculator 12*7] tail").observation == "[= 84]"
    assert env.action_end("[calculator 12*7] tail") == len("[calculator 12*7]")
    assert env.step("[calculator 1/0]").observation == "[error division by zero]"


# -- lifecycle hooks --------------------------------------------------------------------------


def _run_two_stages(reg, *, fail=False):
    specs = {"gen": RoleSpec(name="gen", description="", config_type=RoleConfig, consumes={"prompt_tokens"}, produces={"y"}),
             "train": RoleSpec(name="train", description="", config_type=RoleConfig, consumes={"y"}, sink=True)}
    stages = {"gen": RecordingStage("gen", {"y": lambda b, c: 1}, fail_at=(0, 1) if fail else None), "train": RecordingStage("train")}
    src = [[Batch(prompt_tokens=np.zeros(2)) for _ in range(2)]]
    return Executor(build_graph(specs), stages, hooks=reg.hook).run(src, steps=1)


def _recorder():
    calls, lock = [], threading.Lock()

    def record(name):
        def fn(role, context, batch=None, error=None):
            with lock:
                index = -1 if context.index is None else context.index
                calls.append((name, role, context.step, index, batch is not None, error is not None))
        return fn

    return calls, record


def test_hook_rlpipe_before_stage():
    calls, record = _recorder()

    def before(role, batch, context):
        record("before")(role, context, batch)

    _run_two_stages(registry_with("obs", rlpipe_before_stage=before))
    assert sorted(c[1:4] for c in calls) == sorted([("gen", 0, 0), ("gen", 0, 1), ("gen", 0, -1),
                                                    ("train", 0, 0), ("train", 0, 1), ("train", 0, -1)])


def test_hook_rlpipe_after_stage():
    calls, record = _recorder()

    def after(role, batch, context):
        record("after")(role, context, batch)

    _run_two_stages(registry_with("obs", rlpipe_after_stage=after))
    assert ("after", "gen", 0, 0, True, False) in calls and ("after", "train", 0, -1, False, False) in calls
    assert len(calls) == 6


def test_hook_rlpipe_on_stage_error():
    from rlpipe import StageError

    calls, record = _recorder()

    def on_error(role, error, context):
        record("error")(role, context, None, error)

    with pytest.raises(StageError):
        _run_two_stages(registry_with("obs", rlpipe_on_stage_error=on_error), fail=True)
    assert calls == [("error", "gen", 0, 1, False, True)]
