"""Summarization against reference summaries: reward ``rouge`` (or ``bleu``); the report
adds ROUGE-1/2/L and corpus BLEU of the greedy summaries.

``task.path``: a JSONL file or directory, or a hub id (default ``EdinburghNLP/xsum``);
``document_field`` and ``summary_field`` name the columns (CNN/DailyMail: article, highlights).
"""

from __future__ import annotations

import dataclasses

import datasets

from rlkit.rewards.text import reference_metrics
from rlkit.settings import ConfigError
from rlkit.tasks.base import TASKS, Task
from rlkit.tasks.sources import TEXT, SourceOptions, load_split


@TASKS.register("summarize")
class SummarizeTask(Task):
    @dataclasses.dataclass
    class Options(SourceOptions):
        document_field: str = "document"
        summary_field: str = "summary"

    def load_split(self, split: str) -> datasets.Dataset:
        o = self.options
        path = self.cfg.path or "EdinburghNLP/xsum"
        rows = load_split(path, split, o, {o.document_field: TEXT, o.summary_field: TEXT})
        missing = {o.document_field, o.summary_field} - set(rows.column_names)
        if missing:
            raise ConfigError(
                f"task.path='{path}': rows lack {sorted(missing)}; set task.options.document_field/summary_field"
            )
        return rows.map(
            lambda row: {
                "question": row[o.document_field],
                "solution": row[o.summary_field],
                "reference": row[o.summary_field],
                "answer": row[o.summary_field],
            },
            remove_columns=rows.column_names,
            desc=f"summarize {split}",
        )

    def metrics(self, completions: list[str], rows: list[dict]) -> dict[str, float]:
        return reference_metrics(completions, [row["reference"] for row in rows])
