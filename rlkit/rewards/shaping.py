"""Reward shaping terms that do not look at the answer (lengths and the like)."""

from __future__ import annotations

from collections.abc import Sequence

from rlkit.rewards.registry import REWARDS


def overlong_penalty_value(length: int, max_length: int, cache_length: int) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO: An Open-Source LLM
    Reinforcement Learning System at Scale", arXiv:2503.14476, Eq. 13):

      R_length(y) = 0                                   if |y| <= L_max - L_cache
                  = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                  = -1                                  if |y| > L_max

    i.e. no penalty up to the cache window, a linear ramp to -1 across it, -1 beyond.
    """
    if max_length <= 0 or not 0 <= cache_length <= max_length:
        raise ValueError(
            f"overlong_penalty needs max_length > 0 and 0 <= cache_length <= max_length (got {max_length}, "
            f"{cache_length})"
        )
    free = max_length - cache_length
    if length <= free:
        return 0.0
    if length <= max_length:
        return (free - length) / cache_length  # cache_length > 0 here: length > free = max_length - cache_length
    return -1.0


@REWARDS.register("overlong_penalty")
def overlong_penalty_reward(
    prompts: list[str],
    completions: list[str],
    completion_ids: Sequence[Sequence[int]] | None = None,
    *,
    max_length: int,
    cache_length: int,
    **_,
) -> list[float]:
    """DAPO's overlong reward shaping (Eq. 13, see :func:`overlong_penalty_value`),
    one value in [-1, 0] per completion, added to the task reward as its own term.

    Lengths are in tokens: ``completion_ids`` (the response token ids, passed by the
    training loop) when given, else whitespace-separated words of the completion text.
    ``max_length`` is L_max and ``cache_length`` L_cache; the paper uses 20480 and 4096
    (an expected maximum of 16384 tokens plus a 4096-token soft-punishment window), with
    generation capped at L_max -- here typically L_max = task.max_new_tokens.
    """
    if completion_ids is not None:
        lengths = [len(ids) for ids in completion_ids]
    else:
        lengths = [len(text.split()) for text in completions]
    return [overlong_penalty_value(n, int(max_length), int(cache_length)) for n in lengths]
