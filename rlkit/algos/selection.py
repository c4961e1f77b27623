"""Response selections for online preference training: from k sampled responses per
prompt and their rewards, the ones to train on, best first.

``fn(scores, settings) -> (index, mask)``: ``scores`` is (B, k); ``index`` (B, m) are
column indices into it, sorted by score, best first; ``mask`` (B, m) is 1 where a
selected response exists (a prompt with nothing to learn from has an empty row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlkit.registry import Registry
from rlkit.settings import Settings

RESPONSE_SELECTIONS: Registry = Registry("response selection", group="algo/selection")


@dataclass
class RejectionSettings(Settings):
    beta: float = 0.5  # temperature of the acceptance probability exp((r - r_max) / beta) (RSO: 0.5)

    def check(self) -> None:
        self.require_positive("beta")


@dataclass
class ThresholdSelectionSettings(Settings):
    correct_threshold: float = 0.5  # keep a response when its reward is above this


@RESPONSE_SELECTIONS.register("best_worst")
def best_and_worst(scores: torch.Tensor, settings: Settings):
    """The highest- and the lowest-reward response as (chosen, rejected); none when
    all rewards tie (online DPO, Guo et al. 2024, arXiv:2402.04792, with a reward as the annotator)."""
    index = torch.stack([scores.argmax(-1), scores.argmin(-1)], dim=-1)
    differ = (scores.max(-1).values > scores.min(-1).values).long()
    return index, differ[:, None].expand(-1, 2).clone()


@RESPONSE_SELECTIONS.register("rejection", RejectionSettings)
def rejection_sampled_pair(scores: torch.Tensor, settings: RejectionSettings):
    """Statistical rejection sampling (Liu et al. 2024, RSO, arXiv:2309.06657, Algorithm 1):
    draw candidates in random order and accept each with probability
    exp((r - r_max) / beta), which turns samples of pi into samples of the optimal
    policy pi* ~ pi exp(r / beta); the first two accepted form a pair ranked by reward.
    RSO uses the DPO loss's beta here too; the max-reward response is always accepted."""
    accept = torch.rand_like(scores) < torch.exp((scores - scores.max(-1, keepdim=True).values) / settings.beta)
    order = torch.randperm(scores.shape[1]).expand_as(scores)
    accepted_first = torch.argsort(accept.gather(1, order).long(), dim=-1, descending=True, stable=True)
    pair = order.gather(1, accepted_first[:, :2])
    pair_scores = scores.gather(1, pair)
    swap = pair_scores[:, 1] > pair_scores[:, 0]
    pair = torch.where(swap[:, None], pair.flip(-1), pair)
    valid = (accept.sum(-1) >= 2) & (pair_scores[:, 0] != pair_scores[:, 1])
    return pair, valid.long()[:, None].expand(-1, 2).clone()


@RESPONSE_SELECTIONS.register("above_threshold", ThresholdSelectionSettings)
def above_threshold(scores: torch.Tensor, settings: ThresholdSelectionSettings):
    """Every response whose reward exceeds ``correct_threshold``, best first: the
    kept set of rejection-sampling fine-tuning (RFT / expert iteration)."""
    index = scores.argsort(dim=-1, descending=True, stable=True)
    return index, (scores.gather(1, index) > settings.correct_threshold).long()
