"""Score normalisation before the advantage (PPO-max's reward normalisation and clipping)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlkit.algos.advantages import _sums_over_processes


@dataclass
class RunningMoments:
    """Mean and variance of every score seen so far (all processes), merged batch by batch
    (Chan et al.'s parallel update of Welford's algorithm)."""

    count: float = 0.0
    mean: float = 0.0
    var: float = 1.0

    def update(self, scores: torch.Tensor) -> None:
        count, total = _sums_over_processes(scores.numel(), scores.double().sum())
        batch_mean = total / max(count, 1.0)
        (squares,) = _sums_over_processes(((scores.double() - batch_mean) ** 2).sum())
        new_count = self.count + count
        delta = batch_mean - self.mean
        m2 = self.var * self.count + squares + delta**2 * self.count * count / new_count
        self.mean, self.var, self.count = self.mean + delta * count / new_count, m2 / new_count, new_count

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var}


def normalise_scores(scores: torch.Tensor, mean: float, var: float, clip: float, eps: float = 1e-8) -> torch.Tensor:
    """(r - mean) / sqrt(var + eps), then clipped into [-clip, clip] when ``clip`` > 0.

    Zheng et al. 2023 ("Secrets of RLHF in Large Language Models Part I", arXiv:2307.04964,
    Sec. 5.3.1, PPO-max) normalise and clip reward-model scores so that rewards keep a stable
    scale; with ``mean``/``var`` from :class:`RunningMoments` the statistics are historical,
    from the batch itself they whiten it."""
    normalised = (scores.double() - mean) / (var + eps) ** 0.5
    if clip > 0:
        normalised = normalised.clamp(-clip, clip)
    return normalised.to(scores.dtype)


def batch_moments(scores: torch.Tensor) -> tuple[float, float]:
    """(mean, population variance) of the scores of the whole batch, all processes."""
    moments = RunningMoments(var=0.0)
    moments.update(scores)
    return moments.mean, moments.var
