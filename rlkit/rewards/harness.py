"""The code reward's test harness: two sandboxed processes, so a completion cannot forge a pass.

In one process a completion controls everything the tests rely on: it can return an object whose
``==`` is always true, patch ``abs`` or ``sorted``, read a pass marker from its own code object
and print it, or exit with status 0 from an ``atexit`` hook. So the *solver* process runs the
completion's program and nothing else, and the *tester* process runs the task's own code (the
prompt, then the row's tests) with the entry point replaced by a proxy. Each call crosses a pipe:
arguments and results travel as plain data (None, bool, int, float, complex, str, bytes and
lists, tuples, sets, frozensets and dicts of them) that the tester rebuilds with exact builtin
types; an exception crosses as its builtin type and message. The verdict is the tester's exit
status, which no completion can touch.

This module runs inside the sandbox (standard library only): :func:`main` is given the payload
that :func:`rlkit.rewards.sandbox.run_tested` writes to the process's stdin.
"""

from __future__ import annotations

import builtins
import json
import os
import sys

MAX_MESSAGE = 1 << 22  # bytes of one call or result; a larger one fails the test
MAX_DEPTH = 100  # nesting of one value
TAGGED = {"tuple": tuple, "set": set, "frozenset": frozenset}


class HarnessError(Exception):
    """The solver answered something that is not a well-formed result."""


def encode(value, depth: int = 0):
    """A JSON-able form of a plain-data value; TypeError for anything else (exact types only:
    a subclass of int or str could carry its own ``__eq__``)."""
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"a {kind.__name__} is not plain data")


def decode(data, depth: int = 0):
    """The value :func:`encode` encoded, rebuilt with exact builtin types; HarnessError otherwise."""
    if depth > MAX_DEPTH:
        raise HarnessError("value nested too deeply")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [decode(v, depth + 1) for v in data]
    if kind is dict and len(data) == 1:
        ((tag, body),) = data.items()
        if tag in TAGGED and type(body) is list:
            return TAGGED[tag](decode(v, depth + 1) for v in body)
        if tag == "dict" and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
            return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) is float for x in body):
            return complex(*body)
    raise HarnessError(f"not a plain-data value: {str(data)[:80]}")


def send(fd: int, message) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data) :]


def receive(stream):
    """One message, or None at the end of the stream."""
    line = stream.readline(MAX_MESSAGE + 1)
    if not line:
        return None
    if len(line) > MAX_MESSAGE or not line.endswith(b"\n"):
        raise HarnessError("message too long or cut short")
    try:
        return json.loads(line)
    except ValueError as error:
        raise HarnessError(f"unreadable message: {error}") from None


def serve(program: str, entry_point: str, calls: int, results: int) -> None:
    """The solver: run the completion's program, then answer calls to its entry point until the
    tester closes the pipe."""
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(program, "solution.py", "exec"), namespace)
        error = None
    except BaseException as raised:  # noqa: BLE001  (reported to the tester at its first call)
        error = raised
    stream = os.fdopen(calls, "rb")
    while (message := receive(stream)) is not None:
        try:
            if error is not None:
                raise error
            args, kwargs = decode(message["args"]), decode(message["kwargs"])
            reply = {"return": encode(namespace[entry_point](*args, **kwargs))}
        except BaseException as raised:  # noqa: BLE001  (a failing call fails the test, in the tester)
            reply = {"raise": [type(raised).__name__, str(raised)[:1000]]}
        send(results, reply)


def proxy(calls: int, results: int):
    """The tester's stand-in for the entry point: each call runs in the solver."""
    stream = os.fdopen(results, "rb")

    def call(*args, **kwargs):
        send(calls, {"args": encode(list(args)), "kwargs": encode(kwargs)})
        reply = receive(stream)
        if type(reply) is not dict or len(reply) != 1:
            raise HarnessError("the solver answered no result")
        if "return" in reply:
            return decode(reply["return"])
        name, message = reply.get("raise") if type(reply.get("raise")) is list else ("", "")
        raised = getattr(builtins, str(name), None)
        if isinstance(raised, type) and issubclass(raised, Exception):
            raise raised(str(message))
        raise RuntimeError(f"{name}: {message}")

    return call


def test(prompt: str, tests: str, entry_point: str, calls: int, results: int) -> None:
    """The tester: the task's prompt and tests, with the entry point a proxy; raises if a test fails."""
    namespace = {"__name__": "__main__"}
    exec(compile(prompt, "prompt.py", "exec"), namespace)
    namespace[entry_point] = proxy(calls, results)
    exec(compile(tests, "tests.py", "exec"), namespace)


def main(payload: dict) -> None:
    if payload["role"] == "solver":
        serve(payload["program"], payload["entry_point"], payload["calls"], payload["results"])
    else:
        test(payload["prompt"], payload["tests"], payload["entry_point"], payload["calls"], payload["results"])
        sys.stdout.flush()
