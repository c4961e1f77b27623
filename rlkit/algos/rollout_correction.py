"""Training-inference mismatch: how far the rollout engine's behaviour log-probs are from the
trainer's, and corrections of the policy-gradient update for it (``algo/rollout_correction``).

An inference engine (vLLM) samples with its own kernels, batch shapes and often precision, so
the distribution it sampled from, pi_b, differs slightly from the trainer's pi_old with the
same weights, and the on-policy gradient becomes an off-policy one (Yao et al. 2025, "Your
Efficient RL Framework Secretly Brings You Off-Policy RL Training", fengyao.notion.site/off-policy-rl).
Every function here takes the trainer's and the behaviour log-probs of the sampled tokens,
(B, T) with a (B, T) response mask, and is a pure function of them.

A correction returns a :class:`Correction`: per-token weights on the policy-gradient loss
and/or the sequences to leave out of the update, with its statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlkit.registry import Registry
from rlkit.settings import Settings

ROLLOUT_CORRECTIONS: Registry = Registry("rollout correction", group="algo/rollout_correction")


@dataclass
class Correction:
    """``token_weights`` (B, T) multiply the per-token policy-gradient loss (None: 1); sequences
    with ``kept`` (B,) False leave the update, the loss's normalisers included (None: all kept).
    ``stats`` are averaged over response tokens when (B, T), over responses when (B,)."""

    token_weights: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] | None = None


def log_ratios(trainer_log_probs: torch.Tensor, behaviour_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi_old(y_t) - log pi_b(y_t) on response tokens, 0 on padding."""
    return (trainer_log_probs - behaviour_log_probs) * mask


def mismatch_terms(
    trainer_log_probs: torch.Tensor, behaviour_log_probs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-token pieces of the mismatch statistics, for summing over tokens and processes:
    ``kl`` is k3 = r - 1 - log r with r = pi_old / pi_b (Schulman's estimator of KL(pi_b || pi_old)
    from tokens sampled by pi_b: unbiased and never negative), ``ratio`` is r (1 on padding)."""
    log_ratio = log_ratios(trainer_log_probs, behaviour_log_probs, mask).clamp(-20.0, 20.0)
    # expm1: exp(x) - 1 without the cancellation near x = 0 that made tiny mismatches read as negative KL
    return {"kl": (torch.expm1(log_ratio) - log_ratio) * mask, "ratio": torch.exp(log_ratio)}


@ROLLOUT_CORRECTIONS.register("none")
def no_correction(trainer_log_probs, behaviour_log_probs, mask, settings) -> Correction:
    """Train on the engine's samples as if the trainer had drawn them (the mismatch is only logged)."""
    return Correction(stats={})


@dataclass
class TruncatedISSettings(Settings):
    cap: float = 2.0  # C: token weights min(pi_old / pi_b, C) (Yao et al. 2025; verl's TIS examples: 2)

    def check(self) -> None:
        self.require(self.cap >= 1, "cap", "must be at least 1 (the weight of a token without mismatch)")


@ROLLOUT_CORRECTIONS.register("tis", TruncatedISSettings)
def truncated_importance_sampling(trainer_log_probs, behaviour_log_probs, mask, settings) -> Correction:
    """Token-level truncated importance sampling (Yao et al. 2025): each token's policy-gradient
    loss is weighted by w_t = min(pi_old(y_t) / pi_b(y_t), C), turning the estimate on pi_b's
    samples back into one for the trainer's pi_old; the cap bounds the variance (and biases the
    estimate where it binds). The PPO ratio pi_theta / pi_old itself is unchanged."""
    ratio = mismatch_terms(trainer_log_probs, behaviour_log_probs, mask)["ratio"]
    weights = ratio.clamp(max=settings.cap) * mask
    capped = (ratio > settings.cap).float() * mask
    return Correction(token_weights=weights, stats={"weight_mean": weights, "capped_frac": capped})


@dataclass
class SequenceMaskSettings(Settings):
    low: float = 0.5  # sequences whose ratio pi_old(y) / pi_b(y) is below this leave the update
    high: float = 2.0  # ... or above this (verl's sequence-level rejection: an upper threshold, lower = 1 / upper)
    weighted: bool = False  # also weight the kept sequences' loss by their ratio (Seq-MIS, Liu, Li et al. 2025)

    def check(self) -> None:
        self.require(0 <= self.low <= 1, "low", "must be in [0, 1]")
        self.require(self.high >= 1, "high", "must be at least 1")


@ROLLOUT_CORRECTIONS.register("mask", SequenceMaskSettings)
def sequence_mask(trainer_log_probs, behaviour_log_probs, mask, settings) -> Correction:
    """Sequence-level rejection: a response whose sequence ratio rho(y) = prod_t pi_old(y_t) / pi_b(y_t)
    leaves [low, high] is dropped from the update (loss and normalisers), as verl's sequence-level
    ``mask`` mode does; ``weighted`` also multiplies the loss of the kept ones by rho(y), which is
    the sequence-level masked importance sampling (Seq-MIS) of Liu, Li et al. 2025, "When Speed
    Kills Stability: Demystifying RL Collapse from the Training-Inference Mismatch"."""
    sequence_log_ratio = log_ratios(trainer_log_probs, behaviour_log_probs, mask).sum(-1)
    low = math.log(settings.low) if settings.low > 0 else -math.inf
    kept = (sequence_log_ratio >= low) & (sequence_log_ratio <= math.log(settings.high))
    weights = None
    if settings.weighted:
        weights = torch.exp(sequence_log_ratio.clamp(max=math.log(settings.high)))[:, None] * mask
    return Correction(token_weights=weights, kept=kept, stats={"rejected_frac": (~kept).float()})
