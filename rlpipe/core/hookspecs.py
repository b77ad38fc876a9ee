"""The hooks a plugin can implement.

A plugin is a module (or object) named by an entry point in the ``rlpipe``
group.  Its functions named ``rlpipe_<hook>`` (optionally decorated with
:data:`hookimpl`) implement the hooks below.  *Registration* hooks return an
iterable of typed records from :mod:`rlpipe.core.specs`; *lifecycle* hooks
observe a run.

Every hook here is documented, with its signature, in ``docs/plugins.md``;
a meta-test keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from rlpipe.core.specs import (
        AdvantageEstimatorSpec,
        AlgorithmSpec,
        EnvironmentSpec,
        PolicyLossSpec,
        PolicySpec,
        RewardFunctionSpec,
        RoleSpec,
        RolloutEngineSpec,
        TaskSpec,
        ToolParserSpec,
        ToolSpec,
    )
    from rlpipe.core.stage import Batch, StageContext

PROJECT = "rlpipe"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- registration hooks --------------------------------------------------------


@hookspec
def rlpipe_roles() -> Iterable[RoleSpec]:
    """Roles this plugin provides.

    Example::

        import attrs
        from rlpipe import RoleConfig, RoleSpec, hookimpl

        @attrs.frozen(kw_only=True)
        class EchoConfig(RoleConfig):
            pass

        class EchoStage:
            def process(self, batch, *, context):
                return batch.add(echo=batch["completion_tokens"])

        @hookimpl
        def rlpipe_roles():
            yield RoleSpec(name="echo", description="copies completions",
                           config_type=EchoConfig,
                           consumes={"completion_tokens"}, produces={"echo"},
                           factory=lambda config, placement, *, context: EchoStage())
    """


@hookspec
def rlpipe_placement_policies() -> Iterable[PolicySpec]:
    """Colocation policies this plugin provides, selected by ``placement.policy``.

    Example::

        from rlpipe import MeshSpec, PolicySpec, RolePlacement, finish_plan, hookimpl

        class Everywhere:
            def plan(self, requests, devices, *, context):
                ids = [d.id for d in devices]
                roles = [RolePlacement(name=r.name, devices=ids, mesh=MeshSpec.default(len(ids)))
                         for r in requests]
                return finish_plan("everywhere", roles, devices, context)

        @hookimpl
        def rlpipe_placement_policies():
            yield PolicySpec(name="everywhere", description="all roles on all devices",
                             factory=lambda options: Everywhere())
    """


@hookspec
def rlpipe_algorithms() -> Iterable[AlgorithmSpec]:
    """RL algorithms, selected by ``algorithm.name``.

    Example::

        @hookimpl
        def rlpipe_algorithms():
            yield AlgorithmSpec(name="my-grpo", description="GRPO without a reference",
                                roles=("rollout", "trainer"), factory=MyGRPO)
    """


@hookspec
def rlpipe_advantage_estimators() -> Iterable[AdvantageEstimatorSpec]:
    """Advantage estimators.

    Example::

        @hookimpl
        def rlpipe_advantage_estimators():
            yield AdvantageEstimatorSpec(name="mean-baseline", description="reward minus batch mean",
                                         fn=lambda rewards, **_: rewards - rewards.mean())
    """


@hookspec
def rlpipe_policy_losses() -> Iterable[PolicyLossSpec]:
    """Policy losses.

    Example::

        @hookimpl
        def rlpipe_policy_losses():
            yield PolicyLossSpec(name="pg", description="vanilla policy gradient",
                                 fn=lambda logp, advantages, mask, **_: (jnp.where(mask, -logp * advantages, 0.0), {}))
    """


@hookspec
def rlpipe_reward_functions() -> Iterable[RewardFunctionSpec]:
    """Reward functions, computed on the host.

    Example::

        @hookimpl
        def rlpipe_reward_functions():
            yield RewardFunctionSpec(name="short", description="prefers short answers",
                                     fn=lambda prompt, completion, example: 1.0 / (1 + len(completion)))
    """


@hookspec
def rlpipe_tasks() -> Iterable[TaskSpec]:
    """Tasks: sources of prompts and answers, selected by ``task.name``.

    Example::

        @hookimpl
        def rlpipe_tasks():
            yield TaskSpec(name="my-jsonl", description="my data", factory=MyJsonlTask)
    """


@hookspec
def rlpipe_rollout_engines() -> Iterable[RolloutEngineSpec]:
    """Generation backends for the rollout role.

    Example::

        @hookimpl
        def rlpipe_rollout_engines():
            yield RolloutEngineSpec(name="my-server", description="remote server",
                                    factory=MyServerEngine)
    """


@hookspec
def rlpipe_environments() -> Iterable[EnvironmentSpec]:
    """Environments for agentic rollouts, selected by ``roles.rollout.environment.name``.

    An environment object holds one episode: ``reset(example)`` returns the
    first observation (text after the prompt), ``step(action)`` takes the
    policy's turn and returns ``(observation, reward, done)``.

    Example::

        from rlpipe import EnvironmentSpec, hookimpl

        class Echo:
            max_turns = 2

            def reset(self, example):
                self.answer = example["answer"]
                return ""

            def step(self, action):
                if action.strip() == self.answer:
                    return "", 1.0, True
                return f" (want {self.answer}) ", 0.0, False

        @hookimpl
        def rlpipe_environments():
            yield EnvironmentSpec(name="echo", description="says the answer after a wrong try",
                                  factory=lambda options, *, context: Echo())
    """


@hookspec
def rlpipe_tools() -> Iterable[ToolSpec]:
    """Tools the ``tool`` environment offers the policy, named in its ``tools`` option.

    Example::

        from rlpipe import ToolSpec, hookimpl

        @hookimpl
        def rlpipe_tools():
            yield ToolSpec(name="upper", description="upper-cases text",
                           parameters={"type": "object", "properties": {"text": {"type": "string"}},
                                       "required": ["text"]},
                           fn=lambda arguments: arguments["text"].upper())
    """


@hookspec
def rlpipe_tool_parsers() -> Iterable[ToolParserSpec]:
    r"""Tool-call formats (a chat model's native one, ...), named by the ``tool``
    environment's ``parser`` option.

    Example::

        import re
        from rlpipe import ToolParserSpec, hookimpl
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

        @hookimpl
        def rlpipe_tool_parsers():
            yield ToolParserSpec(name="bracket", description="[tool args]", factory=Bracket)
    """


# -- lifecycle hooks -----------------------------------------------------------
# Called from the stage's own thread; several stages run at once, so an
# implementation that keeps state must lock it.


@hookspec
def rlpipe_before_stage(role: str, batch: Batch | None, context: StageContext) -> None:
    """Before a stage processes an item (``batch``) or its barrier (``batch`` is None).

    Example::

        @hookimpl
        def rlpipe_before_stage(role, batch, context):
            print(f"{role} step {context.step} item {context.index}")
    """


@hookspec
def rlpipe_after_stage(role: str, batch: Batch | None, context: StageContext) -> None:
    """After a stage processed an item (``batch`` is its output) or its barrier (None).

    Example::

        @hookimpl
        def rlpipe_after_stage(role, batch, context):
            if batch is not None and "rewards" in batch:
                print(float(batch["rewards"].mean()))
    """


@hookspec
def rlpipe_on_stage_error(role: str, error: BaseException, context: StageContext) -> None:
    """A stage raised; the run is stopping.  ``error`` is the stage's exception.

    Example::

        @hookimpl
        def rlpipe_on_stage_error(role, error, context):
            alert(f"{role} failed at step {context.step}: {error}")
    """


def hook_signature(name: str) -> str:
    """``rlpipe_before_stage(role: str, batch: Batch | None, context: StageContext) -> None``:
    the signature as written in this module, for docs and listings."""
    import inspect

    sig = inspect.signature(globals()[name])
    params = ", ".join(f"{p.name}: {p.annotation}" if p.annotation is not p.empty else p.name for p in sig.parameters.values())
    ret = "" if sig.return_annotation is sig.empty else f" -> {sig.return_annotation}"
    return f"{name}({params}){ret}"


#: Registration hooks, mapped to the record type each must yield and the
#: word used for that kind in listings and errors.
REGISTRATION_HOOKS: dict[str, tuple[str, str]] = {
    "rlpipe_roles": ("role", "RoleSpec"),
    "rlpipe_placement_policies": ("placement policy", "PolicySpec"),
    "rlpipe_algorithms": ("algorithm", "AlgorithmSpec"),
    "rlpipe_advantage_estimators": ("advantage estimator", "AdvantageEstimatorSpec"),
    "rlpipe_policy_losses": ("policy loss", "PolicyLossSpec"),
    "rlpipe_reward_functions": ("reward function", "RewardFunctionSpec"),
    "rlpipe_tasks": ("task", "TaskSpec"),
    "rlpipe_rollout_engines": ("rollout engine", "RolloutEngineSpec"),
    "rlpipe_environments": ("environment", "EnvironmentSpec"),
    "rlpipe_tools": ("tool", "ToolSpec"),
    "rlpipe_tool_parsers": ("tool parser", "ToolParserSpec"),
}

LIFECYCLE_HOOKS: tuple[str, ...] = ("rlpipe_before_stage", "rlpipe_after_stage", "rlpipe_on_stage_error")
