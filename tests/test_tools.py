"""Tool calls (rlkit/envs/tools.py): parsing, the calculator, errors, timeouts, the sandboxed Python tool."""

from __future__ import annotations

import time

import pytest

from rlkit.envs import tools
from rlkit.envs.tools import (
    TOOLS,
    ToolCall,
    ToolError,
    calculator,
    format_tool_call,
    parse_tool_calls,
    run_tool_calls,
)


def test_parses_the_object_and_the_list_forms():
    single = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+2"}}</tool_call>'
    listed = '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b"}]</tool_call>'
    assert parse_tool_calls("Let me compute. " + single) == [ToolCall("calculator", {"expression": "1+2"})]
    assert parse_tool_calls(listed) == [ToolCall("a", {}), ToolCall("b", {})]
    assert parse_tool_calls(single + "\n" + single) == [ToolCall("calculator", {"expression": "1+2"})] * 2
    assert parse_tool_calls('<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>') == [
        ToolCall("a", {"x": 1})
    ]
    assert format_tool_call("calculator", expression="1+2") == single
    assert parse_tool_calls("no call here") == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("<tool_call>{not json}</tool_call>", "malformed tool call: Expecting property name"),
        ('<tool_call>{"name": "a", "arguments": {}', "malformed tool call"),  # never closed
        ('<tool_call>{"arguments": {}}</tool_call>', "malformed tool call: want"),
        ('<tool_call>{"name": "a", "arguments": [1]}</tool_call>', "arguments are not a JSON object"),
        ("<tool_call>[1, 2]</tool_call>", "malformed tool call: want"),
    ],
)
def test_malformed_calls_are_errors_not_exceptions(text, message):
    (parsed,) = parse_tool_calls(text)[:1]
    assert isinstance(parsed, ToolError) and message in str(parsed)


@pytest.mark.parametrize(
    "expression, result",
    [
        ("37*45+12", "1677"),
        ("(876-43)*514", "428162"),
        ("7/2", "3.5"),
        ("1/3", "0.3333333333"),
        ("-(3+4)*2", "-14"),
        ("2**10", "1024"),
        ("17 // 5 + 17 % 5", "5"),
        ("3 x 4", "12"),
        ("1,200 + 0.5", "1200.5"),
        ("0.1 + 0.2", "0.3"),
    ],
)
def test_calculator_is_exact(expression, result):
    assert calculator(expression) == result


@pytest.mark.parametrize(
    "expression, message",
    [
        ("__import__('os').system('true')", "only numbers"),
        ("a + 1", "only numbers"),
        ("[1] * 2", "only numbers"),
        ("2 ** 1000", "exponents must be whole numbers up to 64"),
        ("9 ** 9 ** 9", "exponents must be whole numbers up to 64"),
        ("10 ** 40", "result too large"),
        ("99999999 ** 8", "result too large"),
        ("1 / 0", "division by zero"),
        ("1 +", "cannot parse"),
        ("True + 1", "only numbers"),
    ],
)
def test_calculator_refuses_anything_but_arithmetic(expression, message):
    with pytest.raises(ToolError, match=message):
        calculator(expression)


def test_every_failure_becomes_an_error_observation_and_is_counted():
    def raises(x: int) -> str:
        raise RuntimeError("boom")

    registry = {"calculator": calculator, "raises": raises}
    text = (
        '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
        '<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>'
        '<tool_call>{"name": "raises", "arguments": {"x": 1}}</tool_call>'
        '<tool_call>{"name": "raises", "arguments": {"y": 1}}</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>'
        "<tool_call>oops</tool_call>"
    )
    outcome = run_tool_calls(text, registry, timeout=5.0)
    assert (outcome.calls, outcome.errors) == (6, 5)
    responses = outcome.observation.split("\n</tool_response>")
    assert responses[0] == "<tool_response>\n42"
    assert "error: unknown tool 'search'; available: calculator, raises" in responses[1]
    assert "error: tool 'raises' failed: RuntimeError: boom" in responses[2]
    assert "error: bad arguments for 'raises'" in responses[3]
    assert "error: tool 'calculator' failed: division by zero" in responses[4]
    assert "error: malformed tool call" in responses[5]


def test_a_hanging_tool_is_stopped_by_its_timeout():
    def hangs() -> str:
        time.sleep(30)
        return "never"

    started = time.perf_counter()
    outcome = run_tool_calls('<tool_call>{"name": "hangs", "arguments": {}}</tool_call>', {"hangs": hangs}, timeout=0.2)
    assert time.perf_counter() - started < 2.0
    assert (outcome.calls, outcome.errors) == (1, 1)
    assert "error: tool 'hangs' timed out after 0.2 s" in outcome.observation


@pytest.fixture(scope="module")
def sandbox():
    from rlkit.rewards.sandbox import SandboxUnavailable, check_sandbox

    try:
        check_sandbox()
    except SandboxUnavailable as reason:
        pytest.skip(str(reason))


def test_python_tool_runs_in_the_sandbox(sandbox, monkeypatch):
    python = {"python": TOOLS.get("python")}
    ok = run_tool_calls(format_tool_call("python", code="print(6*7)"), python, timeout=10.0)
    assert (ok.observation, ok.errors) == ("<tool_response>\n42\n</tool_response>", 0)
    crash = run_tool_calls(format_tool_call("python", code="1/0"), python, timeout=10.0)
    assert crash.errors == 1 and "ZeroDivisionError: division by zero" in crash.observation
    offline = run_tool_calls(
        format_tool_call("python", code="import socket; socket.create_connection(('1.1.1.1', 80), timeout=2)"),
        python,
        timeout=10.0,
    )
    assert offline.errors == 1  # no network in the sandbox
    monkeypatch.setattr(tools, "PYTHON_WALL_SECONDS", 1.0)
    started = time.perf_counter()
    loop = run_tool_calls(format_tool_call("python", code="while True: pass"), python, timeout=10.0)
    assert loop.errors == 1 and "ran past 1 s" in loop.observation
    assert time.perf_counter() - started < 5.0
