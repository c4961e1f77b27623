"""Per-token estimators of KL(pi || pi_ref) from sampled tokens (Schulman 2020,
"Approximating KL Divergence"): ``fn(log_prob, ref_log_prob) -> (B, T)``.

With ``log_ratio = log pi(y) - log pi_ref(y)`` for y ~ pi:
  k1 = log_ratio                          unbiased, high variance, can be negative
  k2 = log_ratio**2 / 2                   biased, low variance
  k3 = exp(-log_ratio) + log_ratio - 1    unbiased, low variance, always >= 0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlkit.registry import Registry
from rlkit.settings import Checked

KL_ESTIMATORS: Registry = Registry("KL estimator")


@dataclass
class KLSettings(Checked):
    """The KL penalty toward the frozen reference policy (``algo.kl``)."""

    coef: float = 0.0  # beta; 0 loads no reference model at all
    estimator: str = "k3"  # k1 | k2 | k3 (Schulman 2020)
    placement: str = (
        "loss"  # loss: beta * KL added to the loss (GRPO); reward: subtracted per token from the reward (PPO)
    )
    target: float | None = (
        None  # adaptive controller (Ziegler et al. 2019, Eq. 2): the KL per response beta is steered to
    )
    horizon: int = (
        10000  # adaptive controller: samples over which beta may change by a factor 1 +- 0.2 (Ziegler: 10000)
    )

    def check(self) -> None:
        self.require_non_negative("coef")
        self.require_choice("estimator", KL_ESTIMATORS.names())
        self.require_choice("placement", ("loss", "reward"))
        adaptive = self.target is None or (self.target > 0 and self.coef > 0 and self.horizon >= 1)
        self.require(
            adaptive, "target", "the adaptive controller needs target > 0, an initial coef > 0 and horizon >= 1"
        )


@KL_ESTIMATORS.register("k1")
def kl_k1(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    return log_prob - ref_log_prob


@KL_ESTIMATORS.register("k2")
def kl_k2(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_prob - ref_log_prob) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """The estimator used in GRPO's loss (DeepSeekMath Eq. 4)."""
    log_ratio = (ref_log_prob - log_prob).clamp(-20.0, 20.0)
    return torch.exp(log_ratio) - log_ratio - 1.0


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, num_samples: int) -> float:
    """Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences",
    arXiv:1909.08593, Sec. 2.2, Eq. 2) adaptive KL controller, a proportional controller
    in log-space:

    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2),  beta_{t+1} = beta_t (1 + e_t n_t / horizon),

    with KL_t the mean KL per response of this step's rollouts and n_t the number of
    samples (their K_beta = 0.1 corresponds to n_t / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * num_samples / horizon)
