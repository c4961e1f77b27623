"""Masked reductions shared by the algorithm functions."""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1; 0 where the mask is empty."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def group_stats(scores: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample mean, unbiased std and size of the group each sample belongs to.

    A group of one has std 0 (no spread can be measured).
    """
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    scores = scores.to(torch.float64)
    sizes = torch.zeros(num_groups, dtype=torch.float64, device=scores.device).index_add_(
        0, inverse, torch.ones_like(scores)
    )
    sums = torch.zeros_like(sizes).index_add_(0, inverse, scores)
    means = sums / sizes
    squares = torch.zeros_like(sizes).index_add_(0, inverse, (scores - means[inverse]) ** 2)
    stds = torch.where(sizes > 1, (squares / (sizes - 1).clamp(min=1)).sqrt(), torch.zeros_like(sizes))
    return means[inverse], stds[inverse], sizes[inverse]


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over response tokens: 1 for a perfect critic, <= 0 for a useless one."""
    residual_var = float(masked_mean((returns - values - masked_mean(returns - values, mask)) ** 2, mask))
    returns_var = float(masked_mean((returns - masked_mean(returns, mask)) ** 2, mask))
    return 1.0 - residual_var / returns_var if returns_var > 0 else float("nan")


def packing_order(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that pack each row's masked tokens to its front, in order:
    ``x.gather(1, order)`` gives a prefix mask, ``unpack(packed, order)`` puts values back. Recursions
    over time (returns, GAE) run on packed rows, so tokens outside the mask (a multi-turn episode's
    observations) are skipped as if absent. For a mask that is already a prefix, the identity."""
    return torch.sort((mask == 0).to(torch.int8), dim=-1, stable=True).indices


def unpack(packed: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The inverse of ``x.gather(1, order)`` (:func:`packing_order`)."""
    return torch.zeros_like(packed).scatter(1, order, packed)
