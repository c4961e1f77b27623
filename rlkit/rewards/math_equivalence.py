"""Symbolic answer equivalence for competition math (MATH-style ``\\boxed{}`` answers),
by Hugging Face's math-verify: ``\\frac{1}{2}``, ``0.5`` and ``\\dfrac12`` agree, as do
``x(x+2)`` and ``x^2+2x``, intervals, sets and matrices."""

from __future__ import annotations

import threading

from rlkit.rewards.registry import REWARDS


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    start = text.index("{", start) + 1
    depth = 1
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start:end].strip()
    return None


def answers_equivalent(completion: str, answer: str) -> bool:
    """Whether the final answer math-verify extracts from ``completion`` equals ``answer``
    (a LaTeX expression, as in a ``\\boxed{}``)."""
    from math_verify import parse, verify

    # math-verify times out with signal.alarm, which works only on the main thread; on a
    # reward worker thread the pool's timeout (reward.terms.<name>.timeout) bounds it instead.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"${answer}$", parsing_timeout=timeout)
    predicted = parse(completion, parsing_timeout=timeout)
    return bool(gold and predicted and verify(gold, predicted, timeout_seconds=timeout))


@REWARDS.register("math_verify")
def math_verify_reward(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the completion's final answer (preferably its last ``\\boxed{}``) is
    mathematically equivalent to the row's ``answer`` according to math-verify, else 0.0."""
    return [float(answers_equivalent(c, a)) for c, a in zip(completions, answer)]
