"""Code rewards: a completion's program must pass the row's unit tests, run in the sandbox.

With an entry point (HumanEval, and any row that names one) the tests run in a process of their
own and call the completion's function in another (:mod:`rlkit.rewards.harness`): the verdict is
the test process's exit status, which a completion cannot forge. A row without an entry point runs
program and tests in one process and passes when a random marker printed after the tests appears;
there a hostile completion can forge a pass (e.g. by reading the marker from its own code), so
give an entry point wherever the tests call one function."""

from __future__ import annotations

import re
import secrets

from rlkit.rewards.registry import REWARDS, needs
from rlkit.rewards.sandbox import SandboxLimits, check_sandbox, run_python, run_tested

_FENCED = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
# HumanEval's stop sequences (Chen et al. 2021): a continuation ends where a new top-level block starts.
_STOP = re.compile(r"\n(?:class|def|#|if|print)\b")


def program_source(code_prompt: str, completion: str, entry_point: str = "") -> str:
    """The program a completion stands for. A plain completion continues the prompt (the
    function's signature and docstring, HumanEval style) up to HumanEval's stop sequences;
    a fenced code block is taken alone when it defines ``entry_point`` itself (a chat
    model rewriting the function), else appended to the prompt."""
    match = _FENCED.search(completion)
    if not match:
        return code_prompt + _STOP.split(completion, maxsplit=1)[0]
    code = match.group(1)
    if entry_point and re.search(rf"^def {re.escape(entry_point)}\(", code, re.MULTILINE):
        return code
    return code_prompt + code


def test_program(code_prompt: str, completion: str, tests: str, entry_point: str, marker: str) -> str:
    """The program, its tests, then ``marker`` printed: a program that exits early with
    status 0 (``sys.exit(0)`` before the tests) does not print it and does not pass."""
    return f"{program_source(code_prompt, completion, entry_point)}\n\n{tests}\n\nprint({marker!r})\n"


@REWARDS.register("code_tests")
@needs(check_sandbox)  # a missing bubblewrap is found before any model is built
def code_tests_reward(
    prompts: list[str],
    completions: list[str],
    question: list[str],
    tests: list[str],
    entry_point: list[str] | None = None,
    *,
    wall_seconds: float = 10.0,
    cpu_seconds: int = 5,
    memory_mb: int = 512,
    max_processes: int = 8,
) -> list[float]:
    """1.0 where the program (``question`` + completion) passes the row's ``tests`` in a
    fresh sandbox (see :mod:`rlkit.rewards.sandbox`), else 0.0: failing tests, errors,
    time-outs and every limit hit score 0. Raises only when no sandbox can run here."""
    check_sandbox()
    limits = SandboxLimits(
        wall_seconds=wall_seconds, cpu_seconds=cpu_seconds, memory_mb=memory_mb, max_processes=max_processes
    )
    scores = []
    for code_prompt, completion, test, entry in zip(
        question, completions, tests, entry_point or [""] * len(completions)
    ):
        scores.append(float(passes(code_prompt, completion, test, entry, limits)))
    return scores


def passes(code_prompt: str, completion: str, tests: str, entry_point: str, limits: SandboxLimits) -> bool:
    if entry_point:
        program = program_source(code_prompt, completion, entry_point)
        return run_tested(program, code_prompt, tests, entry_point, limits).returncode == 0
    marker = f"all tests passed {secrets.token_hex(8)}"
    result = run_python(test_program(code_prompt, completion, tests, entry_point, marker), limits)
    return result.returncode == 0 and marker in result.stdout
