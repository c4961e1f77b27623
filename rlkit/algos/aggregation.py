"""Loss aggregation: reduce a (B, T) per-token loss to the scalar we differentiate.

The normalisation is a separate knob from the objective (Dr. GRPO, Liu et al.
2025, Sec. 3.1, shows that per-sequence length normalisation biases GRPO).
Counts may be given for the whole (global) minibatch, so that a minibatch split
into micro-batches and ranks sums to exactly the same gradient.
"""

from __future__ import annotations

import torch

from rlkit.registry import Registry

LOSS_AGGREGATIONS: Registry = Registry("loss aggregation")


@LOSS_AGGREGATIONS.register("token-mean")
def token_mean(
    loss: torch.Tensor, mask: torch.Tensor, num_tokens: float, num_seqs: float, horizon: int
) -> torch.Tensor:
    """Sum over all tokens / number of tokens (DAPO, Yu et al. 2025, Eq. 12)."""
    return (loss * mask).sum() / max(num_tokens, 1)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(
    loss: torch.Tensor, mask: torch.Tensor, num_tokens: float, num_seqs: float, horizon: int
) -> torch.Tensor:
    """Mean over tokens of each sequence, then mean over sequences (GRPO, DeepSeekMath Eq. 3)."""
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / max(num_seqs, 1)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(
    loss: torch.Tensor, mask: torch.Tensor, num_tokens: float, num_seqs: float, horizon: int
) -> torch.Tensor:
    """Sum over tokens of each sequence, mean over sequences (REINFORCE-style)."""
    return (loss * mask).sum() / max(num_seqs, 1)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(
    loss: torch.Tensor, mask: torch.Tensor, num_tokens: float, num_seqs: float, horizon: int
) -> torch.Tensor:
    """Sum over tokens divided by a constant horizon (max new tokens), mean over
    sequences: Dr. GRPO's length-unbiased aggregation (Liu et al. 2025, Eq. 2)."""
    return (loss * mask).sum() / (max(num_seqs, 1) * horizon)


def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    horizon: int | None = None,
) -> torch.Tensor:
    """Aggregate with ``mode``; counts default to those of ``mask`` itself."""
    mask = mask.to(loss.dtype)
    return LOSS_AGGREGATIONS.get(mode)(
        loss,
        mask,
        num_tokens=float(mask.sum()) if num_tokens is None else num_tokens,
        num_seqs=mask.shape[0] if num_seqs is None else num_seqs,
        horizon=mask.shape[-1] if horizon is None else horizon,
    )
