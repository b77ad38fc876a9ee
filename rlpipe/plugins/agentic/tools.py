"""Tool calls: the parsed call, the parser protocol, and running a tool.

A *tool* (``rlpipe_tools`` plugin, :class:`rlpipe.core.specs.ToolSpec`) is a
named function with a JSON schema of its arguments.  A *tool parser*
(``rlpipe_tool_parsers`` plugin) is a format: how the policy writes a call,
how a result is shown back, and how tools are described in the prompt.  The
built-in ``tag`` format is::

    <tool>calculator: 12*7</tool>       the policy's call
    <result>84</result>                 the observation
    <error>division by zero</error>     a tool error, also an observation

Everything that can go wrong in a call — a malformed call, an unknown tool,
arguments that do not fit the schema, a tool that raises or runs past its
time limit — becomes an *error observation* (:class:`ToolError`), never an
exception that ends the episode.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs


class ToolError(Exception):
    """A tool call that failed in a way the policy should be told about."""


@attrs.frozen(kw_only=True)
class ToolCall:
    """One call found in the policy's text.

    Attributes:
        name: the tool's name as written.
        arguments: a JSON object of arguments, or a string: the value of the
            tool's single parameter.
        end: the offset in the text just after the call; the turn's text after
            it is discarded.
        error: set when the text holds a call that cannot be read (the reason,
            shown to the policy as a tool error).
    """

    name: str
    arguments: Mapping[str, Any] | str = attrs.field(factory=dict)
    end: int = 0
    error: str | None = None


@runtime_checkable
class ToolParser(Protocol):
    """A tool-call format.

    An implementation must guarantee:

    * ``parse(text)`` returns the **first** complete call in ``text`` (with
      ``end`` just after it), a :class:`ToolCall` with ``error`` set for a call
      that is there but cannot be read, or ``None`` when the text holds no
      call (the text is then the policy's final answer);
    * ``format_result(text, error=...)`` is the observation for a result or an
      error, and ``format_call(name, arguments)`` writes a call that ``parse``
      reads back;
    * ``describe(tools)`` is text for the prompt naming each tool with its
      JSON schema (:meth:`rlpipe.core.specs.ToolSpec.schema`).
    """

    def describe(self, tools: Sequence[Any]) -> str: ...

    def parse(self, text: str) -> ToolCall | None: ...

    def format_call(self, name: str, arguments: Mapping[str, Any]) -> str: ...

    def format_result(self, text: str, *, error: bool = False) -> str: ...


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


def resolve_arguments(tool: Any, arguments: Mapping[str, Any] | str) -> dict[str, Any]:
    """``arguments`` as the tool's arguments object, checked against its schema:
    required properties present, no unknown ones (unless the schema allows
    them), and the JSON type of each property.  A string is the value of the
    tool's only property.

    Raises:
        ToolError: the arguments do not fit (the message says how).
    """
    schema = tool.parameters
    props: dict[str, Any] = schema.get("properties", {}) or {}
    if isinstance(arguments, str):
        if len(props) != 1:
            raise ToolError(f"{tool.name} takes the arguments {json.dumps(sorted(props))}; pass a JSON object")
        arguments = {next(iter(props)): arguments}
    if not isinstance(arguments, Mapping):
        raise ToolError(f"{tool.name}: arguments must be a JSON object, got {type(arguments).__name__}")
    args = dict(arguments)
    missing = [p for p in schema.get("required", []) if p not in args]
    if missing:
        raise ToolError(f"{tool.name}: missing argument(s) {', '.join(missing)}")
    if schema.get("additionalProperties", False) is False and props:
        extra = sorted(set(args) - set(props))
        if extra:
            raise ToolError(f"{tool.name}: unknown argument(s) {', '.join(extra)} (takes {', '.join(props)})")
    for name, value in args.items():
        want = _JSON_TYPES.get((props.get(name) or {}).get("type", ""))
        if want is not None and (not isinstance(value, want) or (want is not bool and isinstance(value, bool))):
            raise ToolError(f"{tool.name}: argument {name} must be a {props[name]['type']}, got {json.dumps(value)}")
    return args


def run_tool(tool: Any, arguments: dict[str, Any], *, timeout_s: float | None = None) -> str:
    """``tool.fn(arguments)`` as text.

    Raises:
        ToolError: the tool raised (its message), or ran past ``timeout_s``
            (the call is abandoned: it runs on in a daemon thread).
    """
    if timeout_s is None:
        return _call(tool, arguments)
    try:
        return call_with_timeout(lambda: _call(tool, arguments), timeout_s, name=f"tool-{tool.name}")
    except CallTimeout:
        raise ToolError(f"{tool.name} timed out after {timeout_s:g} s") from None


class CallTimeout(Exception):
    """A call ran past its time limit (:func:`call_with_timeout`)."""


def call_with_timeout(fn: Any, timeout_s: float, *, name: str) -> Any:
    """``fn()`` on a daemon thread: its result, or what it raised (in the
    caller's thread).

    Raises:
        CallTimeout: ``fn`` was still running after ``timeout_s`` seconds; it
            is abandoned (Python cannot stop a thread) and runs on.
    """
    if timeout_s <= 0:
        raise CallTimeout(name)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name=name, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise CallTimeout(name)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _call(tool: Any, arguments: dict[str, Any]) -> str:
    try:
        result = tool.fn(arguments)
    except ToolError:
        raise
    except Exception as exc:  # noqa: BLE001 - a tool may raise anything; the policy is told
        raise ToolError(str(exc) or type(exc).__name__) from exc
    return result if isinstance(result, str) else json.dumps(result)
