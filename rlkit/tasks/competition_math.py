"""MATH-style competition problems (Hendrycks et al. 2021) with ``\\boxed{}`` answers,
checked for mathematical equivalence by math-verify (reward ``math_verify``).

``task.path``: a hub id (default ``DigitalLearningGmbH/MATH-lighteval``), a directory with
``train.jsonl``/``test.jsonl``, or one JSONL file (``test_size`` rows held out). Rows have
``problem`` and ``solution``, and optionally ``answer``; without it the answer is the
solution's last ``\\boxed{}``.
"""

from __future__ import annotations

import dataclasses

import datasets

from rlkit.rewards.math_equivalence import last_boxed
from rlkit.settings import ConfigError
from rlkit.tasks.base import TASKS, Task
from rlkit.tasks.sources import TEXT, Field, SourceOptions, load_split


@TASKS.register("math")
class MathTask(Task):
    @dataclasses.dataclass
    class Options(SourceOptions):
        test_size: int = 500  # rows held out of a single-file source

    def load_split(self, split: str) -> datasets.Dataset:
        o = self.options
        path = self.cfg.path or "DigitalLearningGmbH/MATH-lighteval"
        rows = load_split(
            path, split, o, {"problem": TEXT, "solution": TEXT, "answer": Field((str, int, float), required=False)}
        )
        missing = {"problem", "solution"} - set(rows.column_names)
        if missing:
            raise ConfigError(
                f"task.path='{path}': rows lack {sorted(missing)}; MATH rows have problem, solution and "
                "optionally answer"
            )
        rows = rows.map(math_row, desc=f"math {split}")
        return rows.filter(lambda row: bool(row["answer"]), desc="rows with an answer")

    def answer_key(self, completion: str) -> str | None:
        boxed = last_boxed(completion)
        return None if boxed is None else "".join(boxed.split())


def math_row(row: dict) -> dict:
    answer = row.get("answer") or last_boxed(row["solution"]) or ""
    return {"question": row["problem"], "solution": row["solution"], "answer": str(answer)}
