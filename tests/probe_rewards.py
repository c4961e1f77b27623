"""Rewards for tests that run the real CLI (importable as ``reward.fn=probe_rewards:...``
with this directory on PYTHONPATH)."""

from __future__ import annotations

import os
import time


def digit_share(prompts, completions, **_) -> list[float]:
    """A dense reward a random model earns: the share of digits in the response."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def paced_digit_share(prompts, completions, **fields) -> list[float]:
    """``digit_share`` after ``RLKIT_TEST_PACE_S`` seconds: steps slow enough to signal a job mid-run."""
    time.sleep(float(os.environ.get("RLKIT_TEST_PACE_S", "0.5")))
    return digit_share(prompts, completions)


def non_finite_digit_share(prompts, completions, **_) -> list[float]:
    """``digit_share``, but +inf, -inf and NaN for three samples of every four."""
    scores = digit_share(prompts, completions)
    return [(float("inf"), float("-inf"), float("nan"), s)[i % 4] for i, s in enumerate(scores)]


def huge(prompts, completions, **_) -> list[float]:
    """Finite, but two such terms sum to +inf: the loss becomes NaN."""
    return [1e308] * len(completions)
