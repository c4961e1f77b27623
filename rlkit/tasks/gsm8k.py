"""GSM8K (Cobbe et al. 2021): grade-school math word problems.

``task.path`` is a hub id (default ``openai/gsm8k``, config ``main``) or a local
directory holding ``train.jsonl`` and ``test.jsonl`` in the official format
(``question``, and ``answer`` = worked solution ending in ``#### <number>``).
"""

from __future__ import annotations

import dataclasses
import os

import datasets

from rlkit.rewards.math import answer_key, extract_answer
from rlkit.settings import ConfigError
from rlkit.tasks.base import TASKS, Task
from rlkit.tasks.sources import TEXT, load_hub, read_json


@TASKS.register("gsm8k")
class GSM8KTask(Task):
    @dataclasses.dataclass
    class Options:
        hub_config: str = "main"  # the hub dataset's config name

    def load_split(self, split: str) -> datasets.Dataset:
        path = self.cfg.path or "openai/gsm8k"
        if os.path.isdir(path):
            file = os.path.join(path, f"{split}.jsonl")
            if not os.path.isfile(file):
                raise ConfigError(
                    f"task.path='{path}': no {split}.jsonl there (GSM8K wants train.jsonl and test.jsonl)"
                )
            raw = read_json(file, {"question": TEXT, "answer": TEXT})
        elif os.path.exists(path) or path.startswith((".", "/")):
            raise ConfigError(f"task.path='{path}' must be a directory with train.jsonl and test.jsonl, or a hub id")
        else:
            raw = load_hub(path, self.options.hub_config, split=split)
        missing = {"question", "answer"} - set(raw.column_names)
        if missing:
            raise ConfigError(
                f"task.path='{path}': {split} rows lack {sorted(missing)}; GSM8K rows have 'question' and 'answer'"
            )
        return raw.map(_split_solution, desc=f"gsm8k {split}")

    def answer_key(self, completion: str):
        return answer_key(completion)


def _split_solution(row: dict) -> dict:
    """GSM8K's ``answer`` is the worked solution; keep it as ``solution`` and the final number as ``answer``."""
    solution = row["answer"]
    return {"solution": solution, "answer": (extract_answer(solution) or "").replace(",", "")}
