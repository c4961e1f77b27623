"""Positive continuation of movie reviews (RL4LMs' IMDB task, Ramamurthy et al. 2023):
the prompt is a review's first ``prompt_words`` words; the reward scores the sentiment
of the continuation (``vader_sentiment``, or ``classifier_sentiment`` with a model).

``task.path``: a text file (one review per line), a directory of ``.txt`` files (one
review each, searched recursively: IMDB's ``aclImdb`` layout), a JSONL file or
directory with a ``text`` field, or a hub id (``stanfordnlp/imdb``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import datasets

from rlkit.settings import ConfigError
from rlkit.tasks.base import TASKS, Task
from rlkit.tasks.sources import TEXT, SourceOptions, held_out, load_split, read_text_lines


@TASKS.register("sentiment")
class SentimentTask(Task):
    @dataclasses.dataclass
    class Options(SourceOptions):
        prompt_words: int = 16  # words of the review shown as the prompt
        continuation_words: int = 24  # words of the review after the prompt, kept as the reference continuation

    def load_split(self, split: str) -> datasets.Dataset:
        o = self.options
        path = self.cfg.path or "stanfordnlp/imdb"
        source = pathlib.Path(path)
        if source.is_file() and source.suffix == ".txt":
            rows = held_out(
                datasets.Dataset.from_dict({"text": read_text_lines(path)}),
                split,
                o.test_size,
                o.seed,
            )
        elif source.is_dir() and any(source.rglob("*.txt")):
            texts = ["\n".join(read_text_lines(str(file))) for file in sorted(source.rglob("*.txt"))]
            rows = held_out(datasets.Dataset.from_dict({"text": texts}), split, o.test_size, o.seed)
        else:
            rows = load_split(path, split, o, {"text": TEXT})
        if "text" not in rows.column_names:
            raise ConfigError(f"task.path='{path}': rows need a 'text' field (the review)")
        rows = rows.map(
            lambda row: review_row(row["text"], o.prompt_words, o.continuation_words),
            remove_columns=rows.column_names,
            desc=f"sentiment {split}",
        )
        return rows.filter(lambda row: bool(row["solution"]), desc="reviews longer than the prompt")


def review_row(text: str, prompt_words: int, continuation_words: int) -> dict:
    words = re.sub(r"<br\s*/?>", " ", text).split()  # IMDB reviews carry HTML line breaks
    return {
        "question": " ".join(words[:prompt_words]),
        "solution": " ".join(words[prompt_words : prompt_words + continuation_words]),
        "answer": "",
    }
