"""Advantage estimators: ``fn(inputs, settings) -> (advantages, returns)``, both (B, T).

All are ``no_grad`` functions of rollout tensors. ``settings`` is the estimator's own
settings dataclass (the ``algo.advantage`` config node). An estimator that reads more than
the rewards declares it: ``@uses("values")``, ``@uses("baseline_scores")``, ...; the
configured value source (``algo.value_source``) must provide those inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlkit.algos.masked import group_stats, packing_order, unpack
from rlkit.registry import Registry
from rlkit.settings import Settings

ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator", group="algo/advantage")


# the AdvantageInputs fields a multi-turn sample stage fills (an environment task's episodes), not a value source
EPISODE_INPUTS = ("turn_index", "state_keys")


def uses(*inputs: str):
    """Declare the optional :class:`AdvantageInputs` fields an estimator reads: values a value
    source provides (``values``, ``baseline_scores``, ...) and the turns of episodes (:data:`EPISODE_INPUTS`)."""

    def mark(fn):
        fn.inputs = inputs
        return fn

    return mark


def compares_within_groups(fn):
    """Mark an estimator whose baseline is the other samples of the same prompt: a group of
    one sample gets advantage 0, so it needs ``algo.group_size >= 2``."""
    fn.compares_within_groups = True
    return fn


@dataclass
class NormalisedSettings(Settings):
    """Settings of estimators that may divide by a standard deviation."""

    norm_by_std: bool = True  # divide by the std (of the group, or of the batch); false = centre only (Dr. GRPO)
    eps: float = 1e-6  # added to the std before dividing

    def check(self) -> None:
        self.require(
            self.eps > 0 or not self.norm_by_std,
            "eps",
            "must be positive when norm_by_std is true (equal rewards have std 0)",
        )


@dataclass
class ReturnSettings(NormalisedSettings):
    gamma: float = 1.0  # discount of the per-token return (REINFORCE++ and RLHF PPO use 1)

    def check(self) -> None:
        super().check()
        self.require(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")


@dataclass
class ThresholdSettings(Settings):
    correct_threshold: float = 0.5  # a sample counts as correct when its score is above this


@dataclass
class WeightedReinforceSettings(ThresholdSettings):
    positive_weight: float = 0.1  # lambda, the weight of correct samples (Zhu et al. 2025 recommend 0.1)

    def check(self) -> None:
        self.require_non_negative("positive_weight")


@dataclass
class BNPOSettings(Settings):
    score_min: float = 0.0  # scores are mapped affinely from [score_min, score_max] onto [0, 1] (then clipped into it)
    score_max: float = 1.0

    def check(self) -> None:
        self.require(self.score_max > self.score_min, "score_max", f"must be above score_min={self.score_min}")


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may use.

    token_rewards: (B, T) the sequence score on the last response token (a multi-turn
        episode: each turn's reward on the turn's last token), plus any per-token shaping
        (e.g. a KL penalty placed in the reward).
    response_mask: (B, T) 1 on the response tokens the policy sampled (a prefix, except in a
        multi-turn episode: observations lie between its replies).
    group_index: (B,) samples drawn for the same prompt share an id.
    values: (B, T) critic values, for estimators that bootstrap.
    baseline_scores: (B,) a per-sample baseline score (e.g. ReMax's greedy reward).
    step_ids: (B, T) which step of its response each token belongs to (0, 1, ...), for
        estimators that assign credit per step (VinePPO's ``vine``); ``values`` then holds
        the value of the state each token's step starts from.
    bootstrap_values: (B,) V(s_T), the value of the state after a response's last token
        when the response did not end there (it was cut off and goes on), for estimators
        that bootstrap (``gae``: T-PPO's Extended GAE); 0 for responses that ended.
    turn_index: (B, T) the turn of each token of a multi-turn episode (0, 1, ...); the
        response mask then covers the replies only, not the observations between them, and
        a turn's reward is the sum of its tokens' rewards.
    state_keys: each episode's environment state per turn, the state each reply was made in
        (hashable, equal for equal states of one instance: GiGPO's anchor states).
    """

    token_rewards: torch.Tensor
    response_mask: torch.Tensor
    group_index: torch.Tensor
    values: torch.Tensor | None = None
    baseline_scores: torch.Tensor | None = None
    step_ids: torch.Tensor | None = None
    bootstrap_values: torch.Tensor | None = None
    turn_index: torch.Tensor | None = None
    state_keys: list | None = None

    @property
    def scores(self) -> torch.Tensor:
        """(B,) total reward of each sample."""
        return (self.token_rewards * self.response_mask).sum(-1)


def _broadcast(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return per_sample.to(mask.dtype if mask.is_floating_point() else torch.float32)[:, None] * mask


@ADVANTAGE_ESTIMATORS.register("grpo", NormalisedSettings)
@compares_within_groups
@torch.no_grad()
def grpo_advantage(inputs: AdvantageInputs, settings: NormalisedSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantage (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2, Eq. 3 context).

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps), the same for every token
    of sample i. With ``norm_by_std = false`` the division is skipped,
    which is Dr. GRPO's unbiased form (Liu et al. 2025, Sec. 3.2).
    """
    scores = inputs.scores
    mean, std, _ = group_stats(scores, inputs.group_index)
    advantages = scores.to(torch.float64) - mean
    if settings.norm_by_std:
        advantages = advantages / (std + settings.eps)
    advantages = _broadcast(advantages.float(), inputs.response_mask)
    return advantages, advantages


# --------------------------------------------------------------------------- shared pieces of the zoo


def _sums_over_processes(*values) -> list[float]:
    """Each value summed over all processes; the values themselves in a single process.

    rlkit.engine is imported only when there is more than one process: importing it
    pulls in DeepSpeed, which the pure functions here should not pay for.
    """
    if (
        not (torch.distributed.is_available() and torch.distributed.is_initialized())
        or torch.distributed.get_world_size() == 1
    ):
        return [float(v) for v in values]
    from rlkit.engine.distributed import all_reduce_sum

    return [all_reduce_sum(float(v)) for v in values]


def _float_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.float64)


def _sequence_scores(inputs: AdvantageInputs) -> torch.Tensor:
    """(B,) float64 total reward of each sample (padding ignored)."""
    return (inputs.token_rewards.to(torch.float64) * _float_mask(inputs.response_mask)).sum(-1)


def _returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{k >= t} gamma^(k - t) r_k over the masked tokens (float64, 0 elsewhere); k counts
    sampled tokens only, so a multi-turn episode's observations are not discounted steps."""
    m = _float_mask(mask)
    rewards = token_rewards.to(torch.float64) * m
    if gamma == 1.0:
        return rewards.flip(-1).cumsum(-1).flip(-1) * m
    order = packing_order(mask)
    rewards, packed_mask = rewards.gather(1, order), m.gather(1, order)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return unpack(returns * packed_mask, order)


def _normalise_over_batch(values: torch.Tensor, mask: torch.Tensor, eps: float, divide: bool) -> torch.Tensor:
    """(values - mean) / (std + eps) with the mean and the (population) std taken over
    every response token of the whole batch, all processes included; 0 on padding."""
    m = _float_mask(mask)
    count, total = _sums_over_processes(m.sum(), (values * m).sum())
    centred = (values - total / max(count, 1.0)) * m
    if not divide:
        return centred
    (squares,) = _sums_over_processes((centred**2).sum())
    return centred / ((squares / max(count, 1.0)) ** 0.5 + eps)


# --------------------------------------------------------------------------- leave-one-out, REINFORCE++, ReMax


@ADVANTAGE_ESTIMATORS.register("rloo")
@compares_within_groups
@torch.no_grad()
def rloo_advantage(inputs: AdvantageInputs, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
    arXiv:2402.14740, their RLOO estimator; the leave-one-out baseline is Kool et al.
    2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!").

    A_i = r_i - 1/(k-1) sum_{j != i} r_j  =  k/(k-1) (r_i - mean(r_group)),

    with k the size of i's group; the whole response is one action, so every token
    of sample i carries A_i. A group of one has no other sample to compare with: 0.
    r_i is the summed token reward, so a KL penalty placed in the reward (k1) makes it
    the paper's r(x, y) - beta log(pi(y|x) / pi_ref(y|x)).
    """
    scores = _sequence_scores(inputs)
    mean, _, size = group_stats(scores, inputs.group_index)
    per_sample = torch.where(size > 1, (scores - mean) * size / (size - 1).clamp(min=1), torch.zeros_like(scores))
    advantages = _broadcast(per_sample.float(), inputs.response_mask)
    return advantages, advantages


@ADVANTAGE_ESTIMATORS.register("reinforce_pp", ReturnSettings)
@torch.no_grad()
def reinforce_pp_advantage(inputs: AdvantageInputs, settings: ReturnSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu et al. 2025, arXiv:2501.03262): token-level return, then global
    batch normalisation.

    A_t = sum_{k >= t} gamma^(k-t) r_k, where r_k is the score on the last token minus
    beta * KL(k) on every token when ``algo.kl.placement = reward`` (with
    ``algo.kl.estimator = k1`` and gamma = 1 this is the paper's
    A_t = r(x, y) - beta sum_{i >= t} log(pi_old(y_i) / pi_SFT(y_i))); then
    A_norm = (A - mean_batch(A)) / std_batch(A), mean and (population) std over every
    response token of the whole batch, summed over all processes.
    Returns (A_norm, A). ``norm_by_std: false`` keeps the centring and skips the division.
    """
    returns = _returns_to_go(inputs.token_rewards, inputs.response_mask, settings.gamma)
    advantages = _normalise_over_batch(returns, inputs.response_mask, settings.eps, settings.norm_by_std)
    return advantages.float(), returns.float()


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline", NormalisedSettings)
@compares_within_groups
@torch.no_grad()
def reinforce_pp_baseline_advantage(
    inputs: AdvantageInputs, settings: NormalisedSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (Hu et al. 2025, arXiv:2501.03262, the group-sampling variant).

    A_i = r_i - mean(r_group), the same on every token of sample i, then the global
    batch normalisation of :func:`reinforce_pp_advantage` over all response tokens.
    r_i is the summed token reward (any KL placed in the reward included); a group of
    one gets A_i = 0 before normalisation.
    """
    scores = _sequence_scores(inputs)
    mean, _, _ = group_stats(scores, inputs.group_index)
    centred = (scores - mean)[:, None] * _float_mask(inputs.response_mask)
    advantages = _normalise_over_batch(centred, inputs.response_mask, settings.eps, settings.norm_by_std).float()
    return advantages, advantages


@ADVANTAGE_ESTIMATORS.register("remax")
@uses("baseline_scores")
@torch.no_grad()
def remax_advantage(inputs: AdvantageInputs, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement
    Learning Method for Aligning Large Language Models", arXiv:2310.10505, Algorithm 1):
    the baseline is the reward of the greedy response to the same prompt.

    A_t = sum_{k >= t} r_k - r(x, y_greedy). Without per-token shaping this is
    r(x, y) - r(x, y_greedy) on every token, the paper's estimator; with a KL penalty in
    the reward each token keeps the penalty still ahead of it. r(x, y_greedy) comes from
    ``inputs.baseline_scores``, which the ``greedy`` value source fills (``algo/value_source=greedy``).
    Returns (A, return-to-go).
    """
    if inputs.baseline_scores is None:
        raise ValueError(
            "advantage 'remax' needs the greedy baseline score of every sample "
            "(AdvantageInputs.baseline_scores): set algo/value_source=greedy"
        )
    mask = _float_mask(inputs.response_mask)
    returns = _returns_to_go(inputs.token_rewards, inputs.response_mask, 1.0)
    advantages = returns - inputs.baseline_scores.to(torch.float64)[:, None] * mask
    return advantages.float(), returns.float()


# --------------------------------------------------------------------------- binary-reward estimators


def _correct(inputs: AdvantageInputs, settings: ThresholdSettings) -> torch.Tensor:
    """(B,) bool: the sample's score is above ``settings.correct_threshold``."""
    return _sequence_scores(inputs) > settings.correct_threshold


@ADVANTAGE_ESTIMATORS.register("nsr", ThresholdSettings)
@torch.no_grad()
def nsr_advantage(inputs: AdvantageInputs, settings: ThresholdSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative Sample Reinforcement (Zhu et al. 2025, "The Surprising Effectiveness of
    Negative Reinforcement in LLM Reasoning", arXiv:2506.01347, the L_NSR objective of
    their decomposition L_RLVR = L_PSR + L_NSR with rewards in {+1, -1}).

    A_i = -1 if sample i is wrong, 0 if it is right (only wrong samples are trained on:
    their likelihood is pushed down). "Right" means score > ``correct_threshold``
    (default 0.5, the midpoint of a {0, 1} verifier; a format bonus below the threshold
    does not make a wrong answer right).
    """
    per_sample = torch.where(_correct(inputs, settings), 0.0, -1.0)
    advantages = _broadcast(per_sample, inputs.response_mask)
    return advantages, advantages


@ADVANTAGE_ESTIMATORS.register("w_reinforce", WeightedReinforceSettings)
@torch.no_grad()
def w_reinforce_advantage(
    inputs: AdvantageInputs, settings: WeightedReinforceSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted REINFORCE (Zhu et al. 2025, arXiv:2506.01347): the objective
    lambda * L_PSR + L_NSR, i.e. right samples are reinforced with weight lambda and
    wrong ones suppressed with weight 1.

    A_i = lambda if sample i is right (score > ``correct_threshold``), else -1.
    The paper recommends lambda = 0.1 (``positive_weight``).
    """
    per_sample = torch.where(_correct(inputs, settings), float(settings.positive_weight), -1.0)
    advantages = _broadcast(per_sample, inputs.response_mask)
    return advantages, advantages


BNPO_MAX_WEIGHT = 1e6  # cap on 1 / f_N(p), as in the authors' code (a group at p = 0 or 1 has density 0)


def bnpo_beta_parameters(p: torch.Tensor, size: torch.Tensor) -> tuple[float, float]:
    """BNPO's (alpha, beta) = (max(1 + a/3, 1), max(1 + b/3, 1)), where (a, b) are the
    method-of-moments Beta parameters of the per-prompt success rates p(q) of the batch:
    a = mu (mu (1 - mu) / var - 1), b = (1 - mu) (mu (1 - mu) / var - 1), with mu and the
    unbiased var taken over prompts (each group once, all processes included).

    ``p`` and ``size`` are per sample (each sample carries its group's rate and size).
    Fewer than two prompts, or no spread between them, gives (1, 1): a uniform density,
    i.e. plain REINFORCE with the group-mean baseline.
    """
    share = 1.0 / size  # a group of n samples contributes n * (1/n) = 1 prompt
    num_prompts, total = _sums_over_processes(share.sum(), (p * share).sum())
    if num_prompts < 2 - 1e-9:
        return 1.0, 1.0
    mu = total / num_prompts
    (squares,) = _sums_over_processes((((p - mu) ** 2) * share).sum())
    var = squares / (num_prompts - 1)
    if var <= 0:
        return 1.0, 1.0
    k = mu * (1 - mu) / var - 1
    return max(1 + k * mu / 3, 1.0), max(1 + k * (1 - mu) / 3, 1.0)


@ADVANTAGE_ESTIMATORS.register("bnpo", BNPOSettings)
@compares_within_groups
@torch.no_grad()
def bnpo_advantage(inputs: AdvantageInputs, settings: BNPOSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Beta Normalization Policy Optimization (Xiao, Zhang & Cao 2025, arXiv:2506.02864).

    A(q, o) = (R(q, o) - p(q)) / f_N(p(q); alpha, beta),

    where p(q) is the mean reward of q's group, f_N the Beta(alpha, beta) density, and
    alpha = 1 + a/3, beta = 1 + b/3 the paper's variance-minimising choice given that
    p(q) ~ Beta(a, b) over the batch (a, b by the method of moments; see
    :func:`bnpo_beta_parameters`). alpha = beta = 1 is REINFORCE with a baseline,
    alpha = beta = 3/2 is GRPO's std normalisation (up to the constant B(3/2, 3/2) = pi/8).

    Scores are mapped from [``score_min``, ``score_max``] onto [0, 1] first (the
    authors' affine map for non-binary rewards). Simplifications, stated plainly:
    scores outside the range are clipped into it (the authors' code asserts instead);
    a group of one uses its own score as p(q), so its advantage is 0 (their code uses
    p = 0); alpha and beta are clamped to >= 1 and 1/f_N to <= 1e6 as in their code;
    the paper's advantage decomposition for several reward terms is not implemented
    (the summed score is treated as one reward).
    """
    low, high = float(settings.score_min), float(settings.score_max)
    rewards = ((_sequence_scores(inputs) - low) / (high - low)).clamp(0.0, 1.0)
    p, _, size = group_stats(rewards, inputs.group_index)
    alpha, beta = bnpo_beta_parameters(p, size)
    log_beta_fn = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    log_density = (
        torch.xlogy(torch.tensor(alpha - 1, dtype=p.dtype), p)
        + torch.xlogy(torch.tensor(beta - 1, dtype=p.dtype), 1 - p)
        - log_beta_fn
    )
    weight = torch.exp(-log_density).clamp(max=BNPO_MAX_WEIGHT)
    advantages = _broadcast((weight * (rewards - p)).float(), inputs.response_mask)
    return advantages, advantages
