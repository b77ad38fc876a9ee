"""rlpipe's built-in environments, registered through the ``rlpipe`` entry point
``environments`` (docs/agentic.md).

* ``single-turn``: one turn, scored with the task's reward functions — any
  task through the agentic path, with the same completions and rewards as
  the plain rollout.
* ``tool``: the policy may call tools (``rlpipe_tools`` plugins) in the format
  of a tool parser (``rlpipe_tool_parsers``); a turn without a call is its
  final answer, scored with the task's reward functions.  Tool errors are
  observations; the episode goes on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from rlpipe.core.config import check
from rlpipe.core.hookspecs import hookimpl
from rlpipe.core.specs import EnvironmentSpec
from rlpipe.plugins.agentic.environment import Step
from rlpipe.plugins.agentic.scoring import TaskRewards
from rlpipe.plugins.agentic.tools import ToolError, resolve_arguments, run_tool
from rlpipe.plugins.rewards import RewardTerm

_OPTIONS = "roles.rollout.environment.options"


@attrs.frozen(kw_only=True)
class SingleTurnOptions:
    """``roles.rollout.environment.options`` of ``single-turn``.

    Attributes:
        rewards: reward functions scoring the turn, ``[{name, weight}]``;
            empty: the task's own, weight 1.
    """

    rewards: tuple[RewardTerm, ...] = ()


class SingleTurnEnvironment:
    """One turn, scored with the task's reward functions: an ordinary task run
    through the agentic path."""

    max_turns = 1

    def __init__(self, options: SingleTurnOptions, *, context: Any):
        self.scorer = TaskRewards(context.run_config, context.registry, options.rewards, path=f"{_OPTIONS}.rewards")
        self.success = 0.0

    def reset(self, example: Mapping[str, Any]) -> str:
        self.example = example
        return ""

    def step(self, action: str) -> Step:
        total, _, success = self.scorer.score(str(self.example.get("prompt", "")), action, self.example)
        self.success = float(success)
        return Step("", total, True)

    def metrics(self) -> dict[str, float]:
        return {"success": self.success}


@attrs.frozen(kw_only=True)
class ToolEnvironmentOptions:
    """``roles.rollout.environment.options`` of ``tool``.

    Attributes:
        tools: the tools the policy may call (``rlpipe_tools`` plugins).
        parser: the tool-call format (``rlpipe_tool_parsers``): ``tag`` or
            ``hermes``.
        describe_tools: begin the episode (the observation of ``reset``) with
            the tools' JSON schemas, as the parser describes them.
        rewards: reward functions scoring the final answer, ``[{name,
            weight}]``; empty: the task's own, weight 1.
        tool_timeout_s: a tool call running longer is abandoned and reported
            to the policy as a tool error; ``null``: no limit.
    """

    tools: tuple[str, ...] = ("calculator",)
    parser: str = attrs.field(default="tag", validator=check(bool, "must be a tool-parser name"))
    describe_tools: bool = True
    rewards: tuple[RewardTerm, ...] = ()
    tool_timeout_s: float | None = attrs.field(default=None, validator=check(lambda v: v > 0, "must be positive, got {value}"))


class ToolEnvironment:
    """Turns are tool calls until one is not: that turn is the final answer.

    The final answer is scored with the task's (or the configured) reward
    functions; they see the episode under ``example["episode"]``:
    ``actions`` (the policy's turns), ``tool_calls`` (``{name, arguments,
    result, error}``) and ``expected_call`` (the example's reference
    ``tool_call``, written in this environment's format, or ``None``).
    """

    def __init__(self, options: ToolEnvironmentOptions, *, context: Any):
        registry = context.registry
        self.options = options
        self.tools = {name: registry.get("rlpipe_tools", name, path=f"{_OPTIONS}.tools[{i}]")
                      for i, name in enumerate(options.tools)}
        self.parser = registry.get("rlpipe_tool_parsers", options.parser, path=f"{_OPTIONS}.parser").factory()
        self.scorer = TaskRewards(context.run_config, registry, options.rewards, path=f"{_OPTIONS}.rewards")
        self.span = context.span
        self.actions: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.success = 0.0

    def reset(self, example: Mapping[str, Any]) -> str:
        self.example = example
        if self.options.describe_tools and self.tools:
            return self.parser.describe(list(self.tools.values()))
        return ""

    def action_end(self, text: str) -> int | None:
        call = self.parser.parse(text)
        return None if call is None else call.end

    def step(self, action: str) -> Step:
        self.actions.append(action)
        call = self.parser.parse(action)
        if call is None:
            return self._final(action)
        with self.span("tool", tool=call.name or "?", call=len(self.calls)):
            result, error = self._run(call)
        self.calls.append({"name": call.name, "arguments": call.arguments, "result": result, "error": error})
        return Step(self.parser.format_result(result, error=error), 0.0, False)

    def _run(self, call: Any) -> tuple[str, bool]:
        try:
            if call.error:
                raise ToolError(call.error)
            tool = self.tools.get(call.name)
            if tool is None:
                raise ToolError(f"unknown tool {call.name!r} (tools: {', '.join(self.tools) or 'none'})")
            return run_tool(tool, resolve_arguments(tool, call.arguments), timeout_s=self.options.tool_timeout_s), False
        except ToolError as exc:
            return str(exc), True

    def _final(self, answer: str) -> Step:
        reference = self.example.get("tool_call")
        expected = None
        if isinstance(reference, Mapping) and "name" in reference:
            expected = self.parser.format_call(str(reference["name"]), dict(reference.get("arguments") or {}))
        episode = {"actions": list(self.actions), "tool_calls": list(self.calls), "expected_call": expected}
        total, _, success = self.scorer.score(str(self.example.get("prompt", "")), answer, {**self.example, "episode": episode})
        self.success = float(success)
        return Step("", total, True)

    def metrics(self) -> dict[str, float]:
        return {"tool_calls": float(len(self.calls)), "tool_errors": float(sum(c["error"] for c in self.calls)),
                "success": self.success}


@hookimpl
def rlpipe_environments():
    yield EnvironmentSpec(name="single-turn", description="one turn scored with the task's reward functions (any task)",
                          factory=SingleTurnEnvironment, config_type=SingleTurnOptions)
    yield EnvironmentSpec(name="tool", description="tool calls until a final answer, scored with the task's reward functions",
                          factory=ToolEnvironment, config_type=ToolEnvironmentOptions)
