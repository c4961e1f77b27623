"""Preference and ranking losses: ``fn(responses, cfg) -> (loss, metrics)``.

``responses`` holds n scored responses per prompt, best first (a preference pair is
n = 2: chosen, rejected). ``loss`` is one value per prompt, (B,); the loop averages
it over prompts. ``metrics`` are scalar tensors. ``cfg`` is the ``algo`` node; each
loss reads only the knobs it documents. Log-probabilities are summed over a
response's tokens (its EOS included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlkit.registry import Registry

PREFERENCE_LOSSES: Registry = Registry("preference loss")


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

    def pair_margin(self) -> torch.Tensor:
        """h = (log pi_c - log pi_ref_c) - (log pi_r - log pi_ref_r), (B,)."""
        chosen, rejected = self.chosen_rejected()
        ratios = self.log_ratios()
        return ratios.gather(1, chosen[:, None])[:, 0] - ratios.gather(1, rejected[:, None])[:, 0]

    def mean_log_probs(self) -> torch.Tensor:
        """Length-normalised log-probs, (B, n)."""
        return self.log_probs / self.lengths.clamp(min=1)

    @property
    def present(self) -> torch.Tensor:
        """(B,) 1 for prompts with at least one response."""
        return self.mask.any(-1).to(self.log_probs.dtype)


def _margin_metrics(h: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"margin": (beta * h).mean(), "accuracy": (h > 0).float().mean()}


@PREFERENCE_LOSSES.register("sigmoid")
def dpo_sigmoid(responses: ResponseSet, cfg):
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, Eq. 7):
    loss = -log sigmoid(beta * h). Knob: ``beta`` (paper: 0.1; 0.5 for summarisation)."""
    h = responses.pair_margin()
    return -F.logsigmoid(cfg.beta * h) * responses.present, _margin_metrics(h, cfg.beta)


@PREFERENCE_LOSSES.register("ipo")
def ipo(responses: ResponseSet, cfg):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", arXiv:2310.12036, Eq. 17): loss = (h - 1 / (2 tau))^2, a squared
    loss that keeps the margin finite. Knob: ``beta`` plays tau (the paper sweeps 0.01-1)."""
    h = responses.pair_margin()
    return (h - 1.0 / (2.0 * cfg.beta)) ** 2 * responses.present, _margin_metrics(h, cfg.beta)


@PREFERENCE_LOSSES.register("hinge")
def slic_hinge(responses: ResponseSet, cfg):
    """SLiC-HF calibration loss (Zhao et al. 2023, arXiv:2305.10425, Eq. 1 with a
    reference-normalised margin as in DPO's appendix): loss = max(0, 1 - beta * h).
    Knob: ``beta`` (1/delta, the margin scale)."""
    h = responses.pair_margin()
    return torch.relu(1.0 - cfg.beta * h) * responses.present, _margin_metrics(h, cfg.beta)


@PREFERENCE_LOSSES.register("cdpo")
def conservative_dpo(responses: ResponseSet, cfg):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): labels
    smoothed by the flip rate eps,
    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    Knobs: ``beta``, ``label_smoothing`` = eps (e.g. 0.1)."""
    h, eps = responses.pair_margin(), cfg.label_smoothing
    loss = -(1.0 - eps) * F.logsigmoid(cfg.beta * h) - eps * F.logsigmoid(-cfg.beta * h)
    return loss * responses.present, _margin_metrics(h, cfg.beta)


@PREFERENCE_LOSSES.register("robust")
def robust_dpo(responses: ResponseSet, cfg):
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409, Eq. 8):
    an unbiased loss under labels flipped with rate eps < 1/2,
    loss = ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps), l(h) = -log sigmoid(beta h).
    Knobs: ``beta``, ``label_smoothing`` = eps."""
    h, eps = responses.pair_margin(), cfg.label_smoothing
    loss = (-(1.0 - eps) * F.logsigmoid(cfg.beta * h) + eps * F.logsigmoid(-cfg.beta * h)) / (1.0 - 2.0 * eps)
    return loss * responses.present, _margin_metrics(h, cfg.beta)


@PREFERENCE_LOSSES.register("rpo")
def rpo(responses: ResponseSet, cfg):
    """DPO + NLL of the chosen response (Pang et al. 2024, "Iterative Reasoning Preference
    Optimization", arXiv:2404.19733, Eq. 1-3): loss = -log sigmoid(beta h) + alpha * NLL_c / |y_c|.
    Knobs: ``beta`` (paper: 0.1), ``rpo_alpha`` = alpha (paper: 1)."""
    h = responses.pair_margin()
    nll = -responses.mean_log_probs()[:, 0]
    metrics = {**_margin_metrics(h, cfg.beta), "chosen_nll": nll.detach().mean()}
    return (-F.logsigmoid(cfg.beta * h) + cfg.rpo_alpha * nll) * responses.present, metrics


@PREFERENCE_LOSSES.register("rrhf")
def rrhf(responses: ResponseSet, cfg):
    """RRHF (Yuan et al. 2023, "Rank Responses to Align Language Models with Human Feedback",
    arXiv:2304.05302, Eq. 2-4): with p_i the length-normalised log-prob,
    loss = sum over pairs with s_i < s_j of max(0, p_i - p_j)  +  w * NLL of the best (token sum).
    Reference-free. Knob: ``sft_weight`` = w (paper: 1)."""
    p, s, m = responses.mean_log_probs(), responses.scores, responses.mask.bool()
    worse = (s[:, :, None] < s[:, None, :]) & m[:, :, None] & m[:, None, :]  # [b, i, j]: response i ranks below j
    rank = (torch.relu(p[:, :, None] - p[:, None, :]) * worse).sum((1, 2))
    nll = -responses.log_probs[:, 0]
    metrics = {"rank_loss": rank.detach().mean(), "best_nll": nll.detach().mean()}
    return (rank + cfg.sft_weight * nll) * responses.present, metrics


@PREFERENCE_LOSSES.register("pro")
def preference_ranking_optimization(responses: ResponseSet, cfg):
    """PRO (Song et al. 2024, "Preference Ranking Optimization for Human Alignment",
    arXiv:2306.17492, Eq. 5 and 9): listwise Plackett-Luce over the ranking, with p the
    length-normalised log-prob,
    loss = -sum_{k < n} log( exp(p_k) / sum_{i >= k} exp(p_i) )  +  w * NLL_1 / |y_1|.
    Reference-free; the paper's score-difference temperatures are not used.
    Knob: ``sft_weight`` = w."""
    p, m = responses.mean_log_probs(), responses.mask.bool()
    masked = p.masked_fill(~m, -1e9)  # finite, so that gradients stay finite
    tail_logsumexp = torch.logcumsumexp(masked.flip(-1), -1).flip(-1)  # log sum_{i >= k} exp(p_i)
    has_rest = m & (m.long().flip(-1).cumsum(-1).flip(-1) > 1)  # k with at least one response after it
    listwise = -((p - tail_logsumexp).masked_fill(~has_rest, 0.0)).sum(-1)
    nll = -p[:, 0]
    metrics = {"listwise_loss": listwise.detach().mean(), "best_nll": nll.detach().mean()}
    return (listwise + cfg.sft_weight * nll) * responses.present, metrics


@PREFERENCE_LOSSES.register("sft")
def kept_responses_nll(responses: ResponseSet, cfg):
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


def pair_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """1 where the chosen response ranks above the rejected one, 0 below, 1/2 for a tie
    (a policy equal to its reference ties every pair)."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()
