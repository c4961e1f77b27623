"""Evaluation statistics."""

from __future__ import annotations

import math
from collections import Counter


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, HumanEval, Eq. 1):
    1 - C(n - c, k) / C(n, k)."""
    if k > num_samples:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def majority_correct(answers: list, correct: list[bool]) -> bool:
    """maj@k (Wang et al. 2023, self-consistency): whether the most frequent final answer
    among k samples is correct (ties: the one sampled first); None answers do not vote."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return correct[answers.index(winner)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std; (0, 0) for no values."""
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def peak_memory() -> dict[str, float]:
    """This process's peak resident memory so far (MiB; Linux reports ru_maxrss in KiB) and,
    on a GPU, the peak memory torch allocated there. A process running several jobs (Hydra's
    basic multirun launcher) reports the peak over all of them."""
    import resource

    import torch

    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak
