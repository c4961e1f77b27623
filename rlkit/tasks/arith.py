"""Synthetic arithmetic: seeded problems with step-by-step reference solutions.

``37+45-12`` is solved as ``37+45=82\\n82-12=70\\n#### 70``, the GSM8K answer
format in miniature, so the same rewards and evaluation apply.
"""

from __future__ import annotations

import dataclasses
import random

import datasets

from rlkit.rewards.math import answer_key
from rlkit.settings import ConfigError
from rlkit.tasks.base import TASKS, Task


@TASKS.register("arith")
class ArithTask(Task):
    @dataclasses.dataclass
    class Options:
        min_digits: int = 1  # fewest digits of an operand
        max_digits: int = 2  # most digits of an operand
        operands: int = 2  # numbers per problem
        operators: str = "+"  # drawn uniformly for each step, from + - *
        train_size: int = 20000
        test_size: int = 500
        seed: int = 0  # the data seed (independent of the training seed, so test sets match across runs)

    def __init__(self, task_cfg):
        super().__init__(task_cfg)
        o = self.options
        if not 1 <= o.min_digits <= o.max_digits:
            raise ConfigError("task.options: need 1 <= min_digits <= max_digits")
        if o.operands < 2:
            raise ConfigError("task.options.operands must be at least 2")
        if not o.operators or set(o.operators) - set("+-*"):
            raise ConfigError(f"task.options.operators='{o.operators}': use characters from '+-*'")
        self._splits = self._generate()

    def _problem(self, rng: random.Random) -> dict[str, str]:
        o = self.options

        def number() -> int:
            digits = rng.randint(o.min_digits, o.max_digits)
            return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

        value = number()
        question, steps, last_op = str(value), [], ""
        for _ in range(o.operands - 1):
            op, operand = rng.choice(o.operators), number()
            result = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
            steps.append(f"{value}{op}{operand}={result}")
            if op == "*" and last_op in ("+", "-"):
                # The steps work left to right; bracket the sum so that the question,
                # read with the usual precedence, has the same answer: (45-57)*2, not 45-57*2.
                question = f"({question})"
            question += f"{op}{operand}"
            value, last_op = result, op
        return {"question": question, "answer": str(value), "solution": "\n".join(steps) + f"\n#### {value}"}

    def _generate(self) -> dict[str, list[dict[str, str]]]:
        """Distinct test problems first, then training problems that avoid every test question."""
        rng = random.Random(self.options.seed)
        test: dict[str, dict[str, str]] = {}
        for _ in range(50 * self.options.test_size):
            if len(test) == self.options.test_size:
                break
            row = self._problem(rng)
            test.setdefault(row["question"], row)
        train = []
        for _ in range(50 * self.options.train_size):
            if len(train) == self.options.train_size:
                break
            row = self._problem(rng)
            if row["question"] not in test:
                train.append(row)
        if not train:
            raise ConfigError(
                "task.options: every possible problem is in the test split; raise max_digits or lower test_size"
            )
        return {"test": list(test.values()), "train": train}

    def load_split(self, split: str) -> datasets.Dataset:
        return datasets.Dataset.from_list(self._splits[split])

    def answer_key(self, completion: str):
        return answer_key(completion)
