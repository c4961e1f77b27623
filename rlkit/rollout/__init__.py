"""Sampling responses from the policy and scoring tokens under a model."""

from rlkit.rollout.generate import Rollout, generate
from rlkit.rollout.logprobs import token_log_probs

__all__ = ["Rollout", "generate", "token_log_probs"]
