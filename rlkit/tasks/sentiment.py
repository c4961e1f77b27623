"""Positive continuation of movie reviews (RL4LMs' IMDB task, Ramamurthy et al. 2023):
the prompt is a review's first ``prompt_words`` words; the reward scores the sentiment
of the continuation (``vader_sentiment``, or ``classifier_sentiment`` with a model).

``task.path``: a text file (one review per line), a directory of ``.txt`` files (one
review each, searched recursively: IMDB's ``aclImdb`` layout), a JSONL file or
directory with a ``text`` field, or a hub id (``stanfordnlp/imdb``). With
``task.options.prompts=generated`` rlkit writes the prompts itself, offline: seeded openings of
reviews of made-up films, neutral or leaning negative (:func:`review_openings`), so the policy has
to turn the review around; they have no reference continuation.
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
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
        prompts: str = "reviews"  # reviews: openings of the reviews at task.path | generated: written by rlkit
        train_size: int = 5000  # generated openings to train on (prompts=generated)

    def __init__(self, task_cfg):
        super().__init__(task_cfg)
        if self.options.prompts not in ("reviews", "generated"):
            raise ConfigError(f"task.options.prompts={self.options.prompts!r} must be one of: reviews, generated")

    def load_split(self, split: str) -> datasets.Dataset:
        o = self.options
        if o.prompts == "generated":
            test, train = split_openings(o.test_size, o.train_size, o.seed)
            rows = test if split == "test" else train
            return datasets.Dataset.from_list([{"question": text, "solution": "", "answer": ""} for text in rows])
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


# Review openings of made-up films: templates x titles x genres x aspects x people (no real review is
# quoted). Each opening stops where the reviewer is about to judge, most of them on a doubtful note.
OPENING_TEMPLATES = (
    "I watched {title} last night with {company}, and the {aspect} was",
    "I had low expectations for {title}, a {genre} everyone kept talking about. The {aspect}",
    "After all the hype I finally saw {title}. To be honest, the {aspect}",
    "{title} is a {genre} that I almost turned off after twenty minutes, because the {aspect}",
    "My review of {title}: I went in knowing nothing about this {genre}, and the {aspect}",
    "I wanted to like {title}. The trailer made this {genre} look fun, but the {aspect}",
    "Watched {title} with {company} on a rainy Sunday. The {aspect} of this {genre}",
    "The critics were split on {title}, and after seeing it with {company} I think the {aspect}",
    "{title} starts slowly, like many a {genre}, and for the first hour the {aspect}",
    "I rented {title} because {company} recommended it. In this {genre} the {aspect}",
    "Two hours of {title} later, I have mixed feelings. The {aspect}",
    "Nobody warned me that {title} would be this kind of {genre}. The {aspect}",
)
TITLES = (
    "The Long Harbor",
    "Midnight Orchard",
    "Paper Satellites",
    "The Quiet Engine",
    "Salt and Thunder",
    "A Winter in Verona",
    "The Last Lighthouse",
    "Copper Valley",
    "Glass Horizon",
    "The Ninth Window",
    "Rivers of Chalk",
    "Northern Static",
    "The Velvet Alibi",
    "Small Hours",
    "Iron Lullaby",
    "The Orchard Thief",
    "Blue Meridian",
    "Ashes of August",
    "The Clockmaker's Son",
    "Wild Acre",
    "Seven Lanterns",
    "The Hollow Crown Hotel",
    "Dust on the Moon",
    "Signal Lost",
    "The Borrowed Summer",
)
GENRES = ("drama", "thriller", "comedy", "horror film", "documentary", "western", "musical", "science fiction film")
ASPECTS = (
    "plot",
    "acting",
    "dialogue",
    "soundtrack",
    "pacing",
    "ending",
    "camera work",
    "script",
    "lead performance",
    "special effects",
)
COMPANY = ("my brother", "a few friends", "my parents", "my partner", "a coworker", "my roommate")


def review_openings(count: int, seed: int) -> list[str]:
    """``count`` distinct seeded review openings (fewer if the templates run out)."""
    rng, openings = random.Random(seed), {}
    for _ in range(50 * count):
        if len(openings) == count:
            break
        text = rng.choice(OPENING_TEMPLATES).format(
            title=rng.choice(TITLES), genre=rng.choice(GENRES), aspect=rng.choice(ASPECTS), company=rng.choice(COMPANY)
        )
        openings.setdefault(text, None)
    return list(openings)


def split_openings(test_size: int, train_size: int, seed: int) -> tuple[list[str], list[str]]:
    """(held-out openings, training openings): one seeded draw, the first ``test_size`` held out."""
    openings = review_openings(test_size + train_size, seed)
    if len(openings) <= test_size:
        raise ConfigError(f"task.options: only {len(openings)} distinct openings; lower test_size or train_size")
    return openings[:test_size], openings[test_size:]
