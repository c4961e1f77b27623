"""Arithmetic with tools: the model may call the calculator (or Python) before it answers.

A reply holding ``<tool_call>`` runs the calls (:mod:`rlkit.envs.tools`) and the
results are the next observation; any other reply is the final answer, read as
GSM8K's ``#### <number>`` (else the last number), and ends the episode with reward 1
if it is right. Rows are synthetic multi-step problems (``37*45+128``: hard to do in
one's head for a small model, one calculator call with a tool) or GSM8K rows from
``gsm8k_path``. With ``tools=""`` the same problems are the no-tool baseline.

The expert calls the calculator once per step of the row's worked solution (GSM8K's
``<<48/2=24>>`` annotations; the whole expression for synthetic rows), then answers.
"""

from __future__ import annotations

import dataclasses
import random
import re

from rlkit.envs.base import Environment, StepResult, register_environment
from rlkit.envs.tools import TOOLS, calculator, format_tool_call, has_tool_call, run_tool_calls
from rlkit.rewards.math import answers_match, extract_answer
from rlkit.settings import ConfigError

ANNOTATION = re.compile(r"<<([^=<>]+)=[^<>]*>>")


@register_environment("tool_arith")
class ToolArithmeticEnv(Environment):
    @dataclasses.dataclass
    class Options(Environment.Options):
        operands: int = 3  # numbers per synthetic problem
        min_digits: int = 2
        max_digits: int = 3
        operators: str = "+-*"  # drawn uniformly for each step
        tools: str = "calculator"  # comma-separated tools the model may call ("" = none: the baseline)
        tool_timeout: float = 10.0  # seconds a tool call may take (the Python tool's sandbox stops at 5)
        gsm8k_path: str | None = None  # a directory with GSM8K's train.jsonl and test.jsonl: use its rows instead
        max_turns: int = 4

        def check(self) -> None:
            super().check()
            self.require(self.operands >= 2, "operands", "must be at least 2")
            self.require(1 <= self.min_digits <= self.max_digits, "max_digits", "need 1 <= min_digits <= max_digits")
            self.require(
                bool(self.operators) and not set(self.operators) - set("+-*"), "operators", "use characters from '+-*'"
            )
            unknown = [name for name in tool_names(self.tools) if name not in TOOLS]
            self.require(
                not unknown,
                "tools",
                f"unknown tool '{unknown[0] if unknown else ''}'; valid: {', '.join(TOOLS.names())}",
            )
            self.require_positive("tool_timeout")

    def __init__(self, options=None):
        super().__init__(options)
        self.tools = {name: TOOLS.get(name) for name in tool_names(self.options.tools)}

    @property
    def system_prompt(self) -> str:
        if not self.tools:
            return "Solve it. End with #### <answer>."
        first = next(iter(self.tools))
        call = format_tool_call(first, **({"code": "print(1+2)"} if first == "python" else {"expression": "1+2"}))
        return f"Solve it. Tools: {', '.join(self.tools)}. Call one like {call}. End with #### <answer>."

    def generate_row(self, rng: random.Random) -> dict:
        o = self.options

        def number() -> str:
            digits = rng.randint(o.min_digits, o.max_digits)
            return str(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1))

        question, last = number(), ""
        for _ in range(o.operands - 1):
            op = rng.choice(o.operators)
            if op == "*" and last in ("+", "-"):
                question = f"({question})"  # keep the left-to-right reading under the usual precedence
            question, last = f"{question}{op}{number()}", op
        return {"question": question, "answer": calculator(question)}

    def rows(self, split: str, size: int) -> list[dict]:
        if not self.options.gsm8k_path:
            return super().rows(split, size)
        from rlkit.tasks.sources import read_json, split_file

        path = split_file(self.options.gsm8k_path, split)
        if path is None:
            raise ConfigError(f"env.gsm8k_path='{self.options.gsm8k_path}': no {split}.jsonl there")
        data = read_json(path)
        return [
            {
                "question": r["question"],
                "answer": (extract_answer(r["answer"]) or "").replace(",", ""),
                "solution": r["answer"],
            }
            for r in data.select(range(min(size, len(data))))
        ]

    def reset(self, row: dict) -> str:
        self.row = row
        self.responses: list[str] = []
        return row["question"]

    def step(self, action: str) -> StepResult:
        if has_tool_call(action):
            outcome = run_tool_calls(action, self.tools, self.options.tool_timeout)
            self.responses.append(outcome.observation)
            return StepResult(
                outcome.observation, 0.0, False, {"tool_calls": outcome.calls, "tool_errors": outcome.errors}
            )
        predicted = extract_answer(action)
        reward = float(answers_match(predicted, self.row["answer"]))
        return StepResult("Correct." if reward else "Wrong.", reward, True, {"invalid_action": int(predicted is None)})

    def state_key(self) -> tuple[str, ...]:
        return tuple(self.responses)

    def expert_action(self) -> str:
        solution = self.row.get("solution")  # GSM8K rows: one call per annotation; synthetic rows: the question
        steps = ANNOTATION.findall(solution) if solution is not None else [self.row["question"]]
        if "calculator" in self.tools and len(self.responses) < len(steps):
            return format_tool_call("calculator", expression=steps[len(self.responses)].strip())
        return f"#### {self.row['answer']}"


def tool_names(tools: str) -> list[str]:
    """The comma-separated tool names of ``tools`` ("" : none)."""
    return [name.strip() for name in tools.split(",") if name.strip()]
