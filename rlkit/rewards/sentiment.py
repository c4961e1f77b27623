"""Sentiment rewards (RL4LMs' IMDB task: continue a review positively): the offline
VADER lexicon (Hutto & Gilbert 2014, shipped with ``vaderSentiment``) or any
sequence-classification model given by path."""

from __future__ import annotations

import functools

from rlkit.rewards.registry import REWARDS


@functools.cache
def vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@REWARDS.register("vader_sentiment")
def vader_sentiment_reward(prompts: list[str], completions: list[str], *, target: str = "positive") -> list[float]:
    """VADER's compound score of each completion in [-1, 1], sign-flipped for ``target=negative``."""
    if target not in ("positive", "negative"):
        raise ValueError(f"target='{target}': use positive or negative")
    sign = 1.0 if target == "positive" else -1.0
    return [sign * vader().polarity_scores(c)["compound"] for c in completions]


@REWARDS.register("vader_positive")
def vader_positive_reward(prompts: list[str], completions: list[str], *, threshold: float = 0.05) -> list[float]:
    """1.0 where VADER's compound score is at least ``threshold`` (VADER's own cut-off for positive), else 0.0."""
    return [float(vader().polarity_scores(c)["compound"] >= threshold) for c in completions]


@functools.cache
def classifier(path: str):
    from transformers import pipeline

    return pipeline("text-classification", model=path, device=-1, top_k=None)


@REWARDS.register("classifier_sentiment")
def classifier_sentiment_reward(
    prompts: list[str], completions: list[str], *, model: str, label: str = "POSITIVE", batch_size: int = 32
) -> list[float]:
    """The probability a sequence-classification ``model`` (a local path or hub id, e.g. a
    DistilBERT fine-tuned on SST-2) gives ``label`` for each completion."""
    outputs = classifier(model)(completions, batch_size=batch_size, truncation=True)
    scores = []
    for ranked in outputs:
        by_label = {item["label"]: item["score"] for item in ranked}
        if label not in by_label:
            raise ValueError(f"model '{model}' has no label '{label}'; labels: {', '.join(by_label)}")
        scores.append(by_label[label])
    return scores
