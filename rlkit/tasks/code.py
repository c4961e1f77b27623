"""Code generation checked by unit tests: HumanEval (Chen et al. 2021) and any JSONL
of the same shape.

Rows become ``question`` (the function's signature and docstring, which the model
continues), ``solution`` (a reference body), ``tests`` (Python that raises on a wrong
program) and ``entry_point``. HumanEval rows (``prompt``, ``canonical_solution``,
``test``, ``entry_point``) get ``tests = test + check(entry_point)``; generic rows give
``prompt`` and ``tests`` (and optionally ``solution``, ``entry_point``). HumanEval has a
single split: ``test_size`` rows drawn with the data ``seed`` are held out.
"""

from __future__ import annotations

import dataclasses

import datasets

from rlkit.settings import ConfigError
from rlkit.tasks.base import TASKS, Task
from rlkit.tasks.sources import OPTIONAL_TEXT, TEXT, SourceOptions, load_split


@TASKS.register("humaneval")
class CodeTask(Task):
    @dataclasses.dataclass
    class Options(SourceOptions):
        test_size: int = 40  # rows held out for evaluation when the source has one split (HumanEval: 164 problems)
        hub_split: str | None = (
            "test"  # the hub dataset's only split, carved into train/test (null: use its own splits)
        )

    def load_split(self, split: str) -> datasets.Dataset:
        if not self.cfg.path:
            raise ConfigError(
                f"task.path is required for task={self.cfg.name}: a JSONL(.gz) file of prompt/tests rows, a "
                "directory or a hub id"
            )
        o = self.options
        rows = load_split(self.cfg.path, split, o, CODE_FIELDS, missing_tests)
        if not (
            {"prompt", "test", "entry_point"} <= set(rows.column_names) or {"prompt", "tests"} <= set(rows.column_names)
        ):
            raise ConfigError(
                f"task.path='{self.cfg.path}': rows need prompt, test and entry_point (HumanEval) or prompt and tests; "
                f"columns: {', '.join(rows.column_names)}"
            )
        return rows.map(code_row, remove_columns=rows.column_names, desc=f"{self.cfg.name} {split}")


TASKS.register("code")(CodeTask)

CODE_FIELDS = {
    "prompt": TEXT,
    **dict.fromkeys(("test", "tests", "entry_point", "canonical_solution", "solution"), OPTIONAL_TEXT),
}


def missing_tests(row: dict) -> str | None:
    if row.get("tests") or (row.get("test") and row.get("entry_point")):
        return None
    return "rows need prompt, test and entry_point (HumanEval) or prompt and tests; this one has none of the tests"


def code_row(row: dict) -> dict:
    """A HumanEval or generic code row in the task's columns."""
    entry_point = row.get("entry_point") or ""
    tests = row["tests"] if row.get("tests") else f"{row['test']}\n\ncheck({entry_point})\n"
    return {
        "question": row["prompt"],
        "solution": row.get("canonical_solution") or row.get("solution") or "",
        "tests": tests,
        "entry_point": entry_point,
        "answer": entry_point,
    }
