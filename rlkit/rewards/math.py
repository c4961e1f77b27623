"""Rule rewards for math word problems with numeric answers (GSM8K style)."""

from __future__ import annotations

import re
from fractions import Fraction

from rlkit.rewards.registry import REWARDS

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_HASH_ANSWER = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_ANY_NUMBER = re.compile(_NUMBER)


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: after ``####``, else inside the last
    ``\\boxed{}``, else the last number in the text."""
    if match := _HASH_ANSWER.findall(text):
        return match[-1]
    if match := _BOXED.findall(text):
        return match[-1].strip()
    if match := _ANY_NUMBER.findall(text):
        return match[-1]
    return None


def parse_number(text: str | None) -> Fraction | None:
    """A number written as an integer, decimal, fraction or LaTeX ``\\frac{a}{b}``,
    with thousands separators, ``$`` and ``%`` ignored; None if it is not one."""
    if text is None:
        return None
    cleaned = re.sub(r"[,$%\s]|\\!|\\,|\\%|\\\$", "", str(text)).rstrip(".")
    frac = re.fullmatch(r"(-?)\\d?frac\{(-?\d+)\}\{(\d+)\}", cleaned)
    if frac:
        cleaned = f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}"
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Numeric equivalence (``0.5`` == ``1/2`` == ``\\frac{1}{2}``), else exact string match."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    return predicted.strip() == str(reference).strip()


def answer_key(text: str):
    """A completion's final answer for majority voting: its number (so ``0.5`` and ``1/2``
    vote together), else its text; None without one."""
    answer = extract_answer(text)
    number = parse_number(answer)
    return number if number is not None else answer


@REWARDS.register("math_answer")
def math_answer_reward(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the completion's final answer equals the row's ``answer`` numerically, else 0.0."""
    return [float(answers_match(extract_answer(c), a)) for c, a in zip(completions, answer)]


@REWARDS.register("math_format")
def math_format_reward(
    prompts: list[str], completions: list[str], pattern: str = r"####\s*-?[\d,.]+\s*$", **_
) -> list[float]:
    """1.0 where the completion ends in the answer format (by default ``#### <number>``)."""
    regex = re.compile(pattern)
    return [float(bool(regex.search(c.strip()))) for c in completions]
