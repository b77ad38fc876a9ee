"""rlpipe's built-in tools and tool-call formats, registered through the
``rlpipe`` entry point ``tools``.

Tools:

* ``calculator``: arithmetic on numbers with ``+ - * / // % **`` and
  parentheses, evaluated exactly (integers stay integers); anything else is
  a tool error (``<error>unsupported syntax: x</error>``).

Tool-call formats (``rlpipe_tool_parsers``):

* ``tag`` (the default; every character is in the built-in character
  tokenizer's vocabulary)::

      <tool>calculator: 12*7</tool>                     a call; the argument is the
      <tool>calculator: {"expression": "12*7"}</tool>   tool's only parameter, or a JSON object
      <result>84</result>                               the result, as an observation
      <error>division by zero</error>                   a tool error, as an observation

* ``gsm8k``: the calculator annotations of GSM8K (Cobbe et al., 2021), the
  shortest format, which the CPU demo's tiny model learns; it calls the
  ``calculator`` tool only::

      <<12*7=          a call: the expression and "="
      84>>             the result, as an observation (an error: "error: ...>>")

* ``hermes``: the JSON-in-tags format of Hermes and Qwen2.5 chat models,
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` answered by
  ``<tool_response>...</tool_response>``, tools listed in ``<tools>``.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections.abc import Mapping, Sequence
from typing import Any

from rlpipe.core.hookspecs import hookimpl
from rlpipe.core.specs import ToolParserSpec, ToolSpec
from rlpipe.plugins.agentic.tools import ToolCall, ToolError

# -- calculator ---------------------------------------------------------------------

#: Longest expression the calculator reads, and the largest exponent and
#: result it computes (so a call cannot stall the rollout).
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**30

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolError("division by zero")
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, complex):
            raise ToolError("the result is not a real number")
        if abs(value) > MAX_MAGNITUDE:
            raise ToolError("the result is too large")
        return value
    raise ToolError(f"unsupported syntax: {ast.unparse(node)}")


def format_number(value: int | float) -> str:
    """``84``, ``2.5``, ``0.3333333333``: integers (and integral floats) without
    a decimal point, other floats to 10 significant digits."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def calculate(expression: str) -> str:
    """Evaluates an arithmetic expression.

    Example:
        >>> calculate("12*7"), calculate("(1+2)/4"), calculate("2**10")
        ('84', '0.75', '1024')

    Raises:
        ToolError: not arithmetic, division by zero, too long or too large.
    """
    text = expression.strip()
    if not text:
        raise ToolError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot read {text!r} as arithmetic") from None
    return format_number(_evaluate(tree))


CALCULATOR = ToolSpec(
    name="calculator",
    description="evaluates arithmetic: numbers, + - * / // % ** and parentheses",
    parameters={"type": "object",
                "properties": {"expression": {"type": "string", "description": "the arithmetic expression, e.g. 12*7"}},
                "required": ["expression"]},
    fn=lambda arguments: calculate(arguments["expression"]),
)


# -- formats ------------------------------------------------------------------------


def _json_object(raw: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        return None, f"arguments are not valid JSON ({exc.msg})"
    if not isinstance(value, dict):
        return None, "arguments must be a JSON object"
    return value, None


class TagFormat:
    """``<tool>NAME: ARGUMENTS</tool>`` → ``<result>...</result>`` /
    ``<error>...</error>`` (see the module docstring)."""

    _CALL = re.compile(r"<tool>(.*?)</tool>", re.S)
    _NAMED = re.compile(r"\s*([A-Za-z0-9_-]+)\s*:(.*)\Z", re.S)

    def describe(self, tools: Sequence[Any]) -> str:
        lines = "".join(json.dumps(t.schema(), separators=(",", ":")) + "\n" for t in tools)
        return f"\nTools (call one as <tool>NAME: ARGUMENTS</tool>):\n{lines}"

    def parse(self, text: str) -> ToolCall | None:
        m = self._CALL.search(text)
        if m is None:
            return None
        named = self._NAMED.match(m.group(1))
        if named is None:
            return ToolCall(name="", arguments=m.group(1), end=m.end(),
                            error="malformed tool call: write <tool>NAME: ARGUMENTS</tool>")
        name, raw = named.group(1), named.group(2).strip()
        if raw.startswith("{"):
            args, error = _json_object(raw)
            return ToolCall(name=name, arguments=args if args is not None else raw, end=m.end(), error=error)
        return ToolCall(name=name, arguments=raw, end=m.end())

    def format_call(self, name: str, arguments: Mapping[str, Any]) -> str:
        values = list(arguments.values())
        if len(values) == 1 and isinstance(values[0], str):
            return f"<tool>{name}: {values[0]}</tool>"
        return f"<tool>{name}: {json.dumps(dict(arguments))}</tool>"

    def format_result(self, text: str, *, error: bool = False) -> str:
        return f"<error>{text}</error>" if error else f"<result>{text}</result>"


class Gsm8kFormat:
    """``<<EXPRESSION=`` answered by ``RESULT>>``: GSM8K's calculator
    annotations; every call is a call of the ``calculator`` tool."""

    _CALL = re.compile(r"<<([^<>=]*)=")

    def describe(self, tools: Sequence[Any]) -> str:
        return "\nCalculator: write <<EXPRESSION= and the result follows, closed by >>.\n"

    def parse(self, text: str) -> ToolCall | None:
        m = self._CALL.search(text)
        return None if m is None else ToolCall(name="calculator", arguments=m.group(1).strip(), end=m.end())

    def format_call(self, name: str, arguments: Mapping[str, Any]) -> str:
        values = list(arguments.values())
        return f"<<{values[0] if len(values) == 1 else json.dumps(dict(arguments))}="

    def format_result(self, text: str, *, error: bool = False) -> str:
        return f"{'error: ' if error else ''}{text}>>"


class HermesFormat:
    """The Hermes / Qwen2.5 format: ``<tool_call>{"name", "arguments"}</tool_call>``
    answered by ``<tool_response>...</tool_response>``."""

    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def describe(self, tools: Sequence[Any]) -> str:
        lines = "".join(json.dumps({"type": "function", "function": t.schema()}) + "\n" for t in tools)
        return ("\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{lines}</tools>\n\n"
                "For each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>\n")

    def parse(self, text: str) -> ToolCall | None:
        m = self._CALL.search(text)
        if m is None:
            return None
        call, error = _json_object(m.group(1))
        if call is None:
            return ToolCall(name="", arguments=m.group(1), end=m.end(), error=error)
        name, args = call.get("name"), call.get("arguments", {})
        if not isinstance(name, str) or not name:
            return ToolCall(name="", arguments=m.group(1), end=m.end(), error='a tool call needs a "name"')
        if isinstance(args, str):  # some models write the arguments object as a JSON string
            parsed, _ = _json_object(args)
            args = parsed if parsed is not None else args
        return ToolCall(name=name, arguments=args, end=m.end())

    def format_call(self, name: str, arguments: Mapping[str, Any]) -> str:
        return f"<tool_call>\n{json.dumps({'name': name, 'arguments': dict(arguments)})}\n</tool_call>"

    def format_result(self, text: str, *, error: bool = False) -> str:
        return f"<tool_response>\n{'error: ' if error else ''}{text}\n</tool_response>"


@hookimpl
def rlpipe_tools():
    yield CALCULATOR


@hookimpl
def rlpipe_tool_parsers():
    yield ToolParserSpec(name="tag", description="<tool>NAME: ARGUMENTS</tool> -> <result>...</result> (char-tokenizer friendly)",
                         factory=TagFormat)
    yield ToolParserSpec(name="gsm8k", description="<<EXPRESSION= -> RESULT>> (GSM8K calculator annotations; calculator only)",
                         factory=Gsm8kFormat)
    yield ToolParserSpec(name="hermes", description='<tool_call>{"name", "arguments"}</tool_call> (Hermes, Qwen2.5)',
                         factory=HermesFormat)


