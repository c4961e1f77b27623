"""Critic losses: ``fn(values, old_values, returns, mask, settings) -> (loss, metrics)``.

``loss`` is per token, (B, T), aggregated like the policy loss; ``settings`` is the loss's
own settings (the ``algo.value_source.loss`` node of the ``critic`` value source).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlkit.algos.masked import masked_mean
from rlkit.registry import Registry
from rlkit.settings import Settings

VALUE_LOSSES: Registry = Registry("value loss", group="algo/value_source/loss")


@dataclass
class ValueClipSettings(Settings):
    clip: float = 0.2  # epsilon: a value moves at most this far from the rollout's value per update (PPO-max: 0.2)

    def check(self) -> None:
        self.require_non_negative("clip")


@VALUE_LOSSES.register("mse")
def mse_value_loss(values, old_values, returns, mask, settings: Settings):
    """0.5 (V(s_t) - R_t)^2: regression onto the GAE returns (Schulman et al. 2017, Eq. 9, L^VF)."""
    loss = 0.5 * (values - returns) ** 2
    return loss, {"values_mean": masked_mean(values.detach(), mask)}


@VALUE_LOSSES.register("clipped", ValueClipSettings)
def clipped_value_loss(values, old_values, returns, mask, settings: ValueClipSettings):
    """Value clipping (OpenAI baselines' PPO2; kept in PPO-max, Zheng et al. 2023,
    "Secrets of RLHF in Large Language Models Part I", Sec. 5.3.1):

    V_clip = V_old + clip(V - V_old, -eps, eps),  loss = 0.5 max((V - R)^2, (V_clip - R)^2),

    so one update cannot move a value further than eps from the rollout's value and
    profit from it.
    """
    eps = settings.clip
    clipped = old_values + (values - old_values).clamp(-eps, eps)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped_error, clipped_error)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((clipped_error > unclipped_error).float(), mask),
            "values_mean": masked_mean(values, mask),
        }
    return loss, metrics
