"""Generalized Advantage Estimation from a critic's values (the PPO estimator), with
T-PPO's extension to responses that were cut off and go on (Extended GAE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlkit.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    ReturnSettings,
    _float_mask,
    _normalise_over_batch,
    uses,
)
from rlkit.algos.masked import packing_order, unpack


@torch.no_grad()
def generalized_advantages(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
    bootstrap_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T) float64 and 0 on padding.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = sum_{k >= 0} (gamma lambda)^k delta_{t+k}

    (Schulman et al. 2016, arXiv:1506.02438, Eq. 16, computed backwards); R_t = A_t + V(s_t).
    After a response's last token, V(s_{t+1}) is ``bootstrap_values`` (B,) when given, else 0:
    0 is right for a response that ended (EOS or the length cap: a terminal state); a response
    that was cut off mid-generation and goes on bootstraps from the critic instead -- T-PPO's
    Extended GAE (EGAE; Fan et al. 2025, "Truncated Proximal Policy Optimization", arXiv:2506.15050:
    the sum stops at the window's last token l-1, and the unseen V(s_l) is taken to be the critic's
    V(s_{l-1}), which the caller passes as the bootstrap). With gamma = lambda = 1 a cut-off response
    gets A_t = sum_{k >= t} r_k + V_boot - V(s_t). A mask with gaps (a multi-turn episode, whose
    observations are not the policy's tokens) is packed first (:func:`packing_order`): t + 1 is the
    next sampled token, so the value of the reply after an observation is the next state's value.
    """
    order = packing_order(response_mask)
    mask = _float_mask(response_mask).to(torch.float64).gather(1, order)
    rewards = token_rewards.to(torch.float64).gather(1, order) * mask
    values = values.to(torch.float64).gather(1, order) * mask
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))  # 0 past each response's last token
    if bootstrap_values is not None:
        lengths = mask.sum(-1).long()
        rows = (lengths > 0).nonzero().squeeze(-1)
        next_values[rows, lengths[rows] - 1] = bootstrap_values.to(torch.float64)[rows]
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for t in reversed(range(deltas.shape[1])):
        running = (deltas[:, t] + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return unpack(advantages, order), unpack(advantages + values, order)


@dataclass
class GAESettings(ReturnSettings):
    lam: float = 0.95  # GAE lambda (Schulman et al. 2016; 0.95 is PPO's and PPO-max's choice)

    def check(self) -> None:
        super().check()
        self.require(0 <= self.lam <= 1, "lam", "must be in [0, 1]")


@ADVANTAGE_ESTIMATORS.register("gae", GAESettings)
@uses("values")
@torch.no_grad()
def gae_advantage(inputs: AdvantageInputs, settings: GAESettings) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) (Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", arXiv:1506.02438, Eq. 11-16); see :func:`generalized_advantages`.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),  with V = 0 after the last response token
    (or ``inputs.bootstrap_values`` there: Extended GAE for cut-off responses, T-PPO);
    A_t = sum_{l >= 0} (gamma lambda)^l delta_{t+l}  (Eq. 16, computed backwards);
    returns R_t = A_t + V(s_t), the critic's regression target.

    lambda = 1 gives A_t = sum_k gamma^(k-t) r_k - V(s_t) (Eq. 18: returns minus values);
    lambda = 0 the one-step TD error (Eq. 17). Over a multi-turn episode the recursion runs over
    the sampled tokens only (the observations between replies are skipped). With ``norm_by_std``
    the advantages are whitened over every
    response token of the batch, all processes included (PPO-max's advantage normalisation,
    Zheng et al. 2023); returns are not.
    """
    if inputs.values is None:
        raise ValueError("advantage 'gae' needs critic values (AdvantageInputs.values): set algo/value_source=critic")
    advantages, returns = generalized_advantages(
        inputs.token_rewards, inputs.values, inputs.response_mask, settings.gamma, settings.lam, inputs.bootstrap_values
    )
    if settings.norm_by_std:
        advantages = _normalise_over_batch(advantages, inputs.response_mask, settings.eps, divide=True)
    return advantages.float(), returns.float()
