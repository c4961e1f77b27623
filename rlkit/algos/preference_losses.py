"""Preference and ranking losses: ``fn(responses, settings) -> (loss, metrics)``.

``responses`` holds n scored responses per prompt, best first (a preference pair is
n = 2: chosen, rejected). ``loss`` is one value per prompt, (B,); the loop averages
it over prompts. ``metrics`` are scalar tensors. ``settings`` is the loss's own settings
dataclass (the ``algo.preference_loss`` node). Log-probabilities are summed over a
response's tokens (its EOS included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlkit.registry import Registry
from rlkit.settings import Settings

PREFERENCE_LOSSES: Registry = Registry("preference loss", group="algo/preference_loss")


@dataclass
class BetaSettings(Settings):
    beta: float = 0.1  # temperature on the log-ratio margin (DPO: 0.1; smaller = further from the reference)

    def check(self) -> None:
        self.require_positive("beta")


@dataclass
class IPOSettings(BetaSettings):
    # false: the paper's h from log-ratios summed over each response's tokens; true: each log-ratio divided by
    # its response's length first, as TRL's IPO does (so TRL's tau is not on the same scale as the paper's)
    length_normalized: bool = False


@dataclass
class NoisyLabelSettings(BetaSettings):
    label_smoothing: float = 0.1  # eps, the assumed fraction of flipped preference labels, in [0, 0.5)

    def check(self) -> None:
        super().check()
        self.require(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")


@dataclass
class RPOSettings(BetaSettings):
    alpha: float = 1.0  # weight of the chosen response's per-token NLL (Pang et al. 2024: 1)

    def check(self) -> None:
        super().check()
        self.require_non_negative("alpha")


@dataclass
class RankingSettings(Settings):
    sft_weight: float = 1.0  # weight of the best response's NLL

    def check(self) -> None:
        self.require_non_negative("sft_weight")


@dataclass(frozen=True)
class ResponseSet:
    """n responses to each of B prompts, sorted best first; all (B, n).

    log_probs: sum of token log-probs under the policy.
    ref_log_probs: the same under the frozen reference, or None (reference-free losses).
    lengths: response tokens. scores: higher is better. mask: 1 where a response exists.
    """

    log_probs: torch.Tensor
    ref_log_probs: torch.Tensor | None
    lengths: torch.Tensor
    scores: torch.Tensor
    mask: torch.Tensor

    def chosen_rejected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Column indices (B,) of the best and the worst existing response."""
        last = (self.mask.sum(-1).long() - 1).clamp(min=0)
        return torch.zeros_like(last), last

    def log_ratios(self) -> torch.Tensor:
        """log pi - log pi_ref per response (log pi alone without a reference)."""
        return self.log_probs if self.ref_log_probs is None else self.log_probs - self.ref_log_probs

    def pair_margin(self, length_normalized: bool = False) -> torch.Tensor:
        """h = (log pi_c - log pi_ref_c) - (log pi_r - log pi_ref_r), (B,); with ``length_normalized``
        each log-ratio is divided by its response's token count first."""
        chosen, rejected = self.chosen_rejected()
        ratios = self.log_ratios() / self.lengths.clamp(min=1) if length_normalized else self.log_ratios()
        return ratios.gather(1, chosen[:, None])[:, 0] - ratios.gather(1, rejected[:, None])[:, 0]

    def mean_log_probs(self) -> torch.Tensor:
        """Length-normalised log-probs, (B, n)."""
        return self.log_probs / self.lengths.clamp(min=1)

    @property
    def present(self) -> torch.Tensor:
        """(B,) 1 for prompts with at least one response."""
        return self.mask.any(-1).to(self.log_probs.dtype)


def supervised(fn):
    """Mark a loss trained at supervised-scale learning rates (NLL terms, no reference): its loop
    takes the model preset's supervised learning rate (model.sft_lr) unless algo.optim.lr is set."""
    fn.supervised = True
    return fn


def _margin_metrics(h: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"margin": (beta * h).mean(), "accuracy": (h > 0).float().mean()}


@PREFERENCE_LOSSES.register("sigmoid", BetaSettings)
def dpo_sigmoid(responses: ResponseSet, settings: BetaSettings):
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, Eq. 7):
    loss = -log sigmoid(beta * h). Paper: beta = 0.1 (0.5 for summarisation)."""
    h = responses.pair_margin()
    return -F.logsigmoid(settings.beta * h) * responses.present, _margin_metrics(h, settings.beta)


@PREFERENCE_LOSSES.register("ipo", IPOSettings)
def ipo(responses: ResponseSet, settings: IPOSettings):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", arXiv:2310.12036, Eq. 17): loss = (h - 1 / (2 tau))^2, a squared
    loss that keeps the margin finite; ``beta`` plays tau (the paper sweeps 0.01-1). h is the
    paper's, from log-ratios summed over tokens; ``length_normalized`` divides each log-ratio by
    its response length first, TRL's form (its tau then lives on a per-token scale)."""
    h = responses.pair_margin(settings.length_normalized)
    return (h - 1.0 / (2.0 * settings.beta)) ** 2 * responses.present, _margin_metrics(h, settings.beta)


@PREFERENCE_LOSSES.register("hinge", BetaSettings)
def slic_hinge(responses: ResponseSet, settings: BetaSettings):
    """SLiC-HF calibration loss (Zhao et al. 2023, arXiv:2305.10425, Eq. 1 with a
    reference-normalised margin as in DPO's appendix): loss = max(0, 1 - beta * h).
    ``beta`` is 1/delta, the margin scale."""
    h = responses.pair_margin()
    return torch.relu(1.0 - settings.beta * h) * responses.present, _margin_metrics(h, settings.beta)


@PREFERENCE_LOSSES.register("cdpo", NoisyLabelSettings)
def conservative_dpo(responses: ResponseSet, settings: NoisyLabelSettings):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): labels
    smoothed by the flip rate eps,
    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    ``label_smoothing`` is eps (e.g. 0.1)."""
    h, eps = responses.pair_margin(), settings.label_smoothing
    loss = -(1.0 - eps) * F.logsigmoid(settings.beta * h) - eps * F.logsigmoid(-settings.beta * h)
    return loss * responses.present, _margin_metrics(h, settings.beta)


@PREFERENCE_LOSSES.register("robust", NoisyLabelSettings)
def robust_dpo(responses: ResponseSet, settings: NoisyLabelSettings):
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409, Eq. 8):
    an unbiased loss under labels flipped with rate eps < 1/2,
    loss = ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps), l(h) = -log sigmoid(beta h).
    ``label_smoothing`` is eps."""
    h, eps = responses.pair_margin(), settings.label_smoothing
    loss = (-(1.0 - eps) * F.logsigmoid(settings.beta * h) + eps * F.logsigmoid(-settings.beta * h)) / (1.0 - 2.0 * eps)
    return loss * responses.present, _margin_metrics(h, settings.beta)


@PREFERENCE_LOSSES.register("rpo", RPOSettings)
def rpo(responses: ResponseSet, settings: RPOSettings):
    """DPO + NLL of the chosen response (Pang et al. 2024, "Iterative Reasoning Preference
    Optimization", arXiv:2404.19733, Eq. 1-3): loss = -log sigmoid(beta h) + alpha * NLL_c / |y_c|.
    Paper: beta = 0.1, alpha = 1."""
    h = responses.pair_margin()
    nll = -responses.mean_log_probs()[:, 0]
    metrics = {**_margin_metrics(h, settings.beta), "chosen_nll": nll.detach().mean()}
    return (-F.logsigmoid(settings.beta * h) + settings.alpha * nll) * responses.present, metrics


@PREFERENCE_LOSSES.register("rrhf", RankingSettings)
@supervised
def rrhf(responses: ResponseSet, settings: RankingSettings):
    """RRHF (Yuan et al. 2023, "Rank Responses to Align Language Models with Human Feedback",
    arXiv:2304.05302, Eq. 2-4): with p_i the length-normalised log-prob,
    loss = sum over pairs with s_i < s_j of max(0, p_i - p_j)  +  w * NLL of the best (token sum).
    Reference-free. ``sft_weight`` is w (paper: 1)."""
    p, s, m = responses.mean_log_probs(), responses.scores, responses.mask.bool()
    worse = (s[:, :, None] < s[:, None, :]) & m[:, :, None] & m[:, None, :]  # [b, i, j]: response i ranks below j
    rank = (torch.relu(p[:, :, None] - p[:, None, :]) * worse).sum((1, 2))
    nll = -responses.log_probs[:, 0]
    metrics = {"rank_loss": rank.detach().mean(), "best_nll": nll.detach().mean()}
    return (rank + settings.sft_weight * nll) * responses.present, metrics


@PREFERENCE_LOSSES.register("pro", RankingSettings)
@supervised
def preference_ranking_optimization(responses: ResponseSet, settings: RankingSettings):
    """PRO (Song et al. 2024, "Preference Ranking Optimization for Human Alignment",
    arXiv:2306.17492, Eq. 5 and 9): listwise Plackett-Luce over the ranking, with p the
    length-normalised log-prob,
    loss = -sum_{k < n} log( exp(p_k) / sum_{i >= k} exp(p_i) )  +  w * NLL_1 / |y_1|.
    Reference-free; the paper's score-difference temperatures are not used.
    ``sft_weight`` is w."""
    p, m = responses.mean_log_probs(), responses.mask.bool()
    masked = p.masked_fill(~m, -1e9)  # finite, so that gradients stay finite
    tail_logsumexp = torch.logcumsumexp(masked.flip(-1), -1).flip(-1)  # log sum_{i >= k} exp(p_i)
    has_rest = m & (m.long().flip(-1).cumsum(-1).flip(-1) > 1)  # k with at least one response after it
    listwise = -((p - tail_logsumexp).masked_fill(~has_rest, 0.0)).sum(-1)
    nll = -p[:, 0]
    metrics = {"listwise_loss": listwise.detach().mean(), "best_nll": nll.detach().mean()}
    return (listwise + settings.sft_weight * nll) * responses.present, metrics


@PREFERENCE_LOSSES.register("sft")
@supervised
def kept_responses_nll(responses: ResponseSet, settings: Settings):
    """Supervised NLL on every kept response (per-token mean, averaged over a prompt's
    responses): rejection-sampling fine-tuning / expert iteration (Yuan et al. 2023,
    "Scaling Relationship on Learning Mathematical Reasoning with LLMs", arXiv:2308.01825)."""
    m = responses.mask.to(responses.log_probs.dtype)
    nll = -(responses.mean_log_probs() * m).sum(-1) / m.sum(-1).clamp(min=1)
    return nll * responses.present, {"kept_per_prompt": m.sum(-1).mean()}


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model loss per pair (Bradley & Terry 1952; Ouyang et al. 2022, InstructGPT,
    Eq. 1): -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


REFERENCE_FREE = ("rrhf", "pro", "sft")  # losses that never read ref_log_probs (algo.reference may be none)


def implicit_reward_beta(settings) -> float:
    """beta of DPO's implicit reward beta * log(pi / pi_ref) for reporting margins: the loss's own
    beta, or DPO's default for losses that have none."""
    return getattr(settings, "beta", BetaSettings.beta)


def pair_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """1 where the chosen response ranks above the rejected one, 0 below, 1/2 for a tie
    (a policy equal to its reference ties every pair)."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()
