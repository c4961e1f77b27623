"""Rule rewards usable with any task: answer-tag format and repetition. (Length: the
``overlong_penalty`` term of rlkit.rewards.shaping.)"""

from __future__ import annotations

import re

from rlkit.rewards.registry import REWARDS


@REWARDS.register("answer_tags")
def answer_tags_reward(prompts: list[str], completions: list[str], *, think: bool = False) -> list[float]:
    """1.0 where the completion holds exactly one non-empty ``<answer>...</answer>`` and
    nothing after it; with ``think``, it must also open with one ``<think>...</think>``
    (DeepSeek-R1's format reward)."""
    head = r"\s*<think>(?:(?!</?think>).)+</think>" if think else ""
    pattern = re.compile(rf"{head}(?:(?!</?answer>).)*<answer>(?:(?!</?answer>).)+</answer>\s*", re.DOTALL)
    return [float(bool(pattern.fullmatch(c))) for c in completions]


def repeated_ngram_fraction(tokens: list[str], n: int) -> float:
    """The fraction of a sequence's n-grams that repeat an earlier one (0 for fewer than n tokens)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@REWARDS.register("repetition_penalty")
def repetition_penalty_reward(prompts: list[str], completions: list[str], *, ngram: int = 3) -> list[float]:
    """Minus the fraction of repeated word ``ngram``-grams, in [-1, 0]: 0 for text that
    never repeats itself, near -1 for a completion looping on one phrase."""
    return [-repeated_ngram_fraction(c.split(), ngram) for c in completions]
