"""Policy losses: ``fn(log_prob, old_log_prob, advantages, mask, settings) -> (loss, metrics)``.

``loss`` is per token, (B, T); aggregation happens afterwards
(:mod:`rlkit.algos.aggregation`). ``metrics`` are scalar tensors, returned rather
than logged. ``settings`` is the loss's own settings dataclass (the ``algo.policy_loss`` node).
A loss may also name keyword arguments from :data:`OPTIONAL_INPUTS`:
``ref_log_prob`` (B, T) under the frozen reference (initial) policy, and
``group_index`` (B,) for pairwise losses; the loop then passes them and keeps each
group's samples together in every micro-batch.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from rlkit.algos.masked import masked_mean
from rlkit.registry import Registry
from rlkit.settings import Settings

POLICY_LOSSES: Registry = Registry("policy loss", group="algo/policy_loss")


@dataclass
class ClipSettings(Settings):
    clip_low: float = 0.2  # PPO epsilon below 1: the ratio is kept above 1 - clip_low
    clip_high: float = 0.2  # PPO epsilon above 1 (DAPO recommends 0.28: "clip-higher")

    def check(self) -> None:
        self.require_non_negative("clip_low", "clip_high")
        self.require(self.clip_low < 1, "clip_low", "must be below 1")


@dataclass
class ClippedSettings(ClipSettings):
    # dual clip (Ye et al. 2020): with A < 0 the loss is at most -c A, however large the ratio; null = off (verl: 3.0)
    clip_ratio_c: float | None = None

    def check(self) -> None:
        super().check()
        self.require(
            self.clip_ratio_c is None or self.clip_ratio_c > 1, "clip_ratio_c", "must be above 1 (or null: off)"
        )


@dataclass
class GPPOSettings(ClipSettings):
    beta1: float = (
        0.75  # gradient scale of tokens clipped below (ratio < 1 - clip_low, A < 0); paper: 0.75 (7B), 0.5 (1.5B)
    )
    beta2: float = 1.0  # gradient scale of tokens clipped above (ratio > 1 + clip_high, A > 0); paper: 1.0

    def check(self) -> None:
        super().check()
        self.require_non_negative("beta1", "beta2")


@dataclass
class PSPOSettings(Settings):
    alpha: float = 0.1  # smoothing of pi toward pi_old before the ratio, in [0, 1); 0 = the unclipped ratio

    def check(self) -> None:
        self.require(0 <= self.alpha < 1, "alpha", "must be in [0, 1) (1 would freeze the policy at pi_old)")


@dataclass
class APASettings(Settings):
    lam: float = 1.0  # lambda: the target is log pi_init + A / lambda; larger = closer to pi_init

    def check(self) -> None:
        self.require_positive("lam")


@dataclass
class REBELSettings(Settings):
    eta: float = 1.0  # log-ratio differences are divided by eta (the paper tunes it per task)

    def check(self) -> None:
        self.require_positive("eta")


@dataclass
class P3OSettings(ClipSettings):
    clipping: str = "joint"  # joint (P3O-V2) clips the pair's log-ratio difference, separate (P3O-V1) each response's
    weight_cap: float = 10.0  # c: the pair's importance weight rho1 rho2 is clipped into [1/c, c]; 1 = no weighting

    def check(self) -> None:
        super().check()
        self.require_choice("clipping", ("joint", "separate"))
        self.require(self.weight_cap >= 1, "weight_cap", "must be at least 1 (the weight is clipped into [1/c, c])")


@dataclass
class CoPGSettings(Settings):
    beta: float = 0.1  # beta of R_beta = r - beta ln(pi / pi_ref)

    def check(self) -> None:
        self.require_positive("beta")


def vanishes_at_zero_advantage(fn):
    """Mark a loss whose every token term is its advantage times a finite factor:
    a response whose advantages are all zero adds exactly no gradient, so the
    update may skip its forward and backward."""
    fn.vanishes_at_zero_advantage = True
    return fn


@POLICY_LOSSES.register("clipped", ClippedSettings)
@vanishes_at_zero_advantage
def clipped_surrogate(log_prob, old_log_prob, advantages, mask, settings: ClippedSettings):
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7) with asymmetric
    bounds ``[1 - clip_low, 1 + clip_high]`` (DAPO's clip-higher, Yu et al. 2025, Eq. 10).

    loss_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t),
    r_t = exp(log_prob_t - old_log_prob_t).

    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement
    Learning", arXiv:1912.09729, Eq. 5), with ``clip_ratio_c`` = c > 1: where A_t < 0 the loss is
    also capped at -c A_t, so a token whose ratio has grown far past 1 + eps_high cannot push an
    unbounded update (the surrogate -r A grows without limit there); its gradient is then 0.
    """
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - settings.clip_low, 1.0 + settings.clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if settings.clip_ratio_c is not None:
        capped = -settings.clip_ratio_c * advantages
        dual = (advantages < 0) & (capped < loss)
        loss = torch.where(dual, capped, loss)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((clipped < unclipped).float(), mask),
            "clip_frac_low": masked_mean(((ratio < 1.0 - settings.clip_low) & (advantages < 0)).float(), mask),
            "clip_frac_high": masked_mean(((ratio > 1.0 + settings.clip_high) & (advantages > 0)).float(), mask),
            "clip_frac_dual": masked_mean(dual.float(), mask),
            "approx_kl_old": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def _old_policy_metrics(log_ratio: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"approx_kl_old": masked_mean(0.5 * log_ratio**2, mask), "ratio_mean": masked_mean(ratio, mask)}


@POLICY_LOSSES.register("gspo", ClipSettings)
@vanishes_at_zero_advantage
def gspo_loss(log_prob, old_log_prob, advantages, mask, settings: ClipSettings):
    """Group Sequence Policy Optimization (Zheng et al. 2025, arXiv:2507.18071), in the
    paper's token-level form GSPO-token.

    s_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp(1/|y_i| sum_t log r_i,t)   (sequence ratio)
    s_i,t = sg[s_i] * pi(y_i,t) / sg[pi(y_i,t)]                                  (value s_i)
    loss_i,t = -min(s_i,t A_i,t, clip(s_i,t, 1 - eps_low, 1 + eps_high) A_i,t)

    Clipping acts on the sequence ratio s_i, so a sequence is clipped as a whole. With
    the ``seq-mean-token-mean`` aggregation and one advantage per sequence, the value and
    the gradient equal the sequence-level GSPO objective
    -1/G sum_i min(s_i A_i, clip(s_i) A_i): d s_i,t = s_i d log pi_t, and averaging over
    the |y_i| tokens gives A_i d s_i. The paper uses eps_low = 3e-4, eps_high = 4e-4.
    """
    maskf = mask.to(log_prob.dtype)
    token_log_ratio = log_prob - old_log_prob
    seq_log_ratio = (token_log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1)
    log_ratio = seq_log_ratio.detach().clamp(-20.0, 20.0)[:, None] + log_prob - log_prob.detach()
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - settings.clip_low, 1.0 + settings.clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        has_tokens = (maskf.sum(-1) > 0).to(log_prob.dtype)
        metrics = {
            "clip_frac": masked_mean((clipped < unclipped).float(), mask),
            "clip_frac_low": masked_mean(((ratio < 1.0 - settings.clip_low) & (advantages < 0)).float(), mask),
            "clip_frac_high": masked_mean(((ratio > 1.0 + settings.clip_high) & (advantages > 0)).float(), mask),
            **_old_policy_metrics(
                token_log_ratio.clamp(-20.0, 20.0), torch.exp(token_log_ratio.clamp(-20.0, 20.0)), mask
            ),
            "seq_ratio_mean": masked_mean(torch.exp(seq_log_ratio.clamp(-20.0, 20.0)), has_tokens),
        }
    return loss, metrics


@POLICY_LOSSES.register("ce_gppo", GPPOSettings)
@vanishes_at_zero_advantage
def ce_gppo_loss(log_prob, old_log_prob, advantages, mask, settings: GPPOSettings):
    """CE-GPPO, gradient-preserving clipping (Su et al. 2025, "CE-GPPO: Coordinating
    Entropy via Gradient-Preserving Clipping Policy Optimization in Reinforcement
    Learning", arXiv:2509.20712; the loss of the authors' reference implementation).

    With r = pi / pi_old and sg the stop-gradient:
      r < 1 - eps_low  and A < 0:  loss = -beta_1 (1 - eps_low) r / sg(r) A
      r > 1 + eps_high and A > 0:  loss = -beta_2 (1 + eps_high) r / sg(r) A
      otherwise:                   loss = -r A
    The forward value of a clipped token is PPO's clipped value scaled by beta, but
    instead of a zero gradient it keeps the bounded gradient
    -beta (1 -/+ eps) A d log pi. Where nothing is clipped this is exactly
    :func:`clipped_surrogate`. The authors' code also applies verl's dual-clip bound on
    negative advantages; that is left out here (our ``clipped`` loss has no dual clip
    either).
    """
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unit = torch.exp(log_prob - log_prob.detach())  # value 1, gradient d log pi: r / sg(r)
    low = (ratio < 1.0 - settings.clip_low) & (advantages < 0)
    high = (ratio > 1.0 + settings.clip_high) & (advantages > 0)
    loss = torch.where(
        low,
        -settings.beta1 * (1.0 - settings.clip_low) * unit * advantages,
        torch.where(high, -settings.beta2 * (1.0 + settings.clip_high) * unit * advantages, -ratio * advantages),
    )
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((low | high).float(), mask),
            "clip_frac_low": masked_mean(low.float(), mask),
            "clip_frac_high": masked_mean(high.float(), mask),
            **_old_policy_metrics(log_ratio, ratio, mask),
        }
    return loss, metrics


@dataclass
class SPOSettings(Settings):
    epsilon: float = (
        0.2  # the trust region's half-width: the ratio is pulled toward 1 + sign(A) epsilon (paper: PPO's 0.2)
    )

    def check(self) -> None:
        self.require_positive("epsilon")


@POLICY_LOSSES.register("spo", SPOSettings)
@vanishes_at_zero_advantage
def spo_loss(log_prob, old_log_prob, advantages, mask, settings: SPOSettings):
    """Simple Policy Optimization (Xie et al. 2025, "Simple Policy Optimization", ICML, arXiv:2401.16025):
    PPO's surrogate "slightly modified", with a quadratic penalty instead of clipping,

    loss_t = -(r_t A_t - |A_t| / (2 eps) (r_t - 1)^2),

    whose maximum over r_t is at r_t = 1 + sign(A_t) eps, the edge of PPO's trust region. Where
    PPO's clipped objective has zero gradient once the ratio leaves [1 - eps, 1 + eps], this one
    keeps pulling the ratio back: d/dr = -(A - |A| (r - 1) / eps), so a ratio past the edge is
    pushed back rather than left free. At r = 1 it is the policy gradient -A d log pi.
    """
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    loss = -(ratio * advantages - advantages.abs() / (2.0 * settings.epsilon) * (ratio - 1.0) ** 2)
    with torch.no_grad():
        outside = (ratio - 1.0).abs() > settings.epsilon
        metrics = {
            **_old_policy_metrics(log_ratio, ratio, mask),
            "outside_trust_region_frac": masked_mean(outside.float(), mask),
        }
    return loss, metrics


@POLICY_LOSSES.register("pspo", PSPOSettings)
@vanishes_at_zero_advantage
def pspo_loss(log_prob, old_log_prob, advantages, mask, settings: PSPOSettings):
    """Probability Smoothing Policy Optimisation (Dwyer, Sobey & Chapman 2025, "It's Not
    You, It's Clipping: A Soft Trust-Region via Probability Smoothing for LLM RL",
    arXiv:2509.21282), in its GRPO form (GR-PSPO).

    The current probability is smoothed toward the behaviour policy before the ratio is
    formed, pi_s = (1 - alpha) pi + alpha pi_old, so
      r_s = pi_s / pi_old = (1 - alpha) r + alpha,      loss = -r_s A   (no clipping).
    The gradient is (1 - alpha) r A d log pi everywhere: never zeroed, and the ratio's
    distance from 1 shrinks by (1 - alpha). alpha = 0 is the unclipped ratio objective.
    Written from the paper's description of the smoothing operator; the value of alpha
    (``alpha``, default 0.1) follows TRL's GR-PSPO example, not a table of the paper.
    """
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    smoothed = (1.0 - settings.alpha) * ratio + settings.alpha
    loss = -smoothed * advantages
    with torch.no_grad():
        metrics = {**_old_policy_metrics(log_ratio, ratio, mask), "smoothed_ratio_mean": masked_mean(smoothed, mask)}
    return loss, metrics


OPTIONAL_INPUTS = ("ref_log_prob", "group_index")


def optional_inputs(fn) -> tuple[str, ...]:
    """The names from :data:`OPTIONAL_INPUTS` that the policy loss ``fn`` declares."""
    return tuple(name for name in OPTIONAL_INPUTS if name in inspect.signature(fn).parameters)


@POLICY_LOSSES.register("apa", APASettings)
def apa_loss(log_prob, old_log_prob, advantages, mask, settings: APASettings, ref_log_prob):
    """Advantage-Induced Policy Alignment (Zhu et al. 2023, "Fine-Tuning Language Models with
    Advantage-Induced Policy Alignment", arXiv:2306.02231, the APA loss of Sec. 3):

    loss_t = (log pi(a_t|s_t) - log pi_init(a_t|s_t) - A_t / lambda)^2,

    a squared error that pulls log pi toward the target log pi_init + A / lambda, i.e. toward
    pi* proportional to pi_init exp(A / lambda), the KL-regularised optimum; pi_init is the
    frozen reference (the starting model).
    """
    target = ref_log_prob + advantages / settings.lam
    loss = (log_prob - target) ** 2
    with torch.no_grad():
        log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
        metrics = {
            **_old_policy_metrics(log_ratio, torch.exp(log_ratio), mask),
            "log_ratio_to_init": masked_mean(log_prob - ref_log_prob, mask),
        }
    return loss, metrics


def _pair_partner(group_index: torch.Tensor) -> torch.Tensor:
    """For each sample, the row of the other sample of its group (groups of exactly two)."""
    same = group_index[:, None] == group_index[None, :]
    same.fill_diagonal_(False)
    if not bool((same.sum(-1) == 1).all()):
        raise ValueError(
            "a pairwise policy loss needs exactly two samples of every group in each micro-batch (algo.group_size=2)"
        )
    return same.to(torch.int64).argmax(-1)


def _pair_terms(log_prob, anchor_log_prob, advantages, mask, group_index):
    """What the pairwise losses share, per row: the partner's row, the sequence log-ratio
    ln pi(y)/pi_anchor(y) (padding ignored) and the reward gap r(y) - r(y'), taken as
    A(y) - A(y') of a per-prompt-baseline advantage (the baseline cancels)."""
    partner = _pair_partner(group_index)
    seq_log_ratio = ((log_prob - anchor_log_prob) * mask.to(log_prob.dtype)).sum(-1)
    seq_advantage = masked_mean(advantages, mask, dim=-1)
    return partner, seq_log_ratio, seq_advantage - seq_advantage[partner]


@POLICY_LOSSES.register("rebel", REBELSettings)
def rebel_loss(log_prob, old_log_prob, advantages, mask, settings: REBELSettings, group_index):
    """REBEL, REinforcement Learning via Regressing Relative Rewards (Gao et al. 2024,
    arXiv:2404.16767, Eq. 1 / Algorithm 1): for the two responses y, y' of one prompt,

    loss = (1/eta (ln pi(y)/pi_old(y) - ln pi(y')/pi_old(y')) - (r(y) - r(y')))^2,

    a least-squares regression of reward differences onto differences of sequence
    log-ratios. r(y) - r(y') is taken as A(y) - A(y') of a group-centred advantage (any
    per-sequence baseline cancels), so the preset uses ``advantage: grpo`` without std
    scaling. The pair's loss is put on every token of both responses: with the
    ``seq-mean-token-mean`` aggregation the objective is the mean over pairs.
    """
    partner, seq_log_ratio, reward_gap = _pair_terms(log_prob, old_log_prob, advantages, mask, group_index)
    residual = (seq_log_ratio - seq_log_ratio[partner]) / settings.eta - reward_gap
    loss = (residual**2)[:, None].expand_as(log_prob)
    with torch.no_grad():
        log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
        metrics = {**_old_policy_metrics(log_ratio, torch.exp(log_ratio), mask), "residual_abs": residual.abs().mean()}
    return loss, metrics


@POLICY_LOSSES.register("p3o", P3OSettings)
def p3o_loss(log_prob, old_log_prob, advantages, mask, settings: P3OSettings, group_index):
    """P3O, Pairwise Proximal Policy Optimization (Wu et al. 2023, arXiv:2310.00212): the
    pairwise policy gradient of Theorem 1 (Sec. 4.1),
    E_{y1,y2 ~ pi_old} rho1 rho2 (r(y1) - r(y2)) grad ln(pi(y1)/pi(y2)) / 2,  rho = pi(y)/pi_old(y),
    made proximal as in Sec. 4.2, in the form of the authors' code (github.com/thwu1/trlx):
    the importance weight is a stop-gradient clipped into [1/c, c], and the sequence
    log-ratios are clipped pessimistically, as in PPO, to +-eps. With
    w = sg(clip(rho1 rho2, 1/c, c)) and g = r(y1) - r(y2), the pair's objective is
      joint (P3O-V2):    w min(d g/2, clip(d, -eps_low, eps_high) g/2),  d = ln(rho1/rho2)
      separate (P3O-V1): the sum over i of w min(l_i g_i/2, clip(l_i, -eps_low, eps_high) g_i/2),
                         l_i = ln rho_i, g_1 = g, g_2 = -g.
    Each response carries its pair's objective (joint) or twice its own term (separate) on
    every token, negated: with ``seq-mean-token-mean`` the loss is minus the mean over
    pairs. At rho = 1 both give the REINFORCE gradient with advantage r(y) - r(y'). The
    KL penalty of the paper's reward (Eq. 2) goes in the reward (``kl.placement: reward``,
    ``k1``). ``clipping`` chooses V1 or V2, ``weight_cap`` is c, ``clip_low`` / ``clip_high`` are eps.
    """
    partner, seq_log_ratio, reward_gap = _pair_terms(log_prob, old_log_prob, advantages, mask, group_index)
    cap = math.log(settings.weight_cap)
    weight = torch.exp((seq_log_ratio + seq_log_ratio[partner]).detach().clamp(-cap, cap))
    if settings.clipping == "joint":
        clipped_log_ratio, share = seq_log_ratio - seq_log_ratio[partner], 0.5
    else:
        clipped_log_ratio, share = seq_log_ratio, 1.0
    unclipped = clipped_log_ratio * reward_gap
    clipped = clipped_log_ratio.clamp(-settings.clip_low, settings.clip_high) * reward_gap
    loss = (-share * weight * torch.minimum(unclipped, clipped))[:, None].expand_as(log_prob)
    with torch.no_grad():
        log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
        metrics = {
            **_old_policy_metrics(log_ratio, torch.exp(log_ratio), mask),
            "clip_frac": (clipped < unclipped).float().mean(),
            "pair_weight_mean": weight.mean(),
        }
    return loss, metrics


@POLICY_LOSSES.register("copg", CoPGSettings)
def copg_loss(log_prob, old_log_prob, advantages, mask, settings: CoPGSettings, ref_log_prob, group_index):
    """CoPG, Contrastive Policy Gradient (Flet-Berliac et al. 2024, arXiv:2406.19185, Sec. 3):
    for two responses y, y' of one prompt, drawn from any policy,

    loss = (R_beta(y) - R_beta(y'))^2,  R_beta(y) = r(y) - beta ln(pi(y)/pi_ref(y)),

    least squares whose unique minimiser is the KL-regularised optimum
    pi* proportional to pi_ref exp(r / beta), whatever the sampling policy: no importance
    ratio, no clipping. Its gradient -2 beta (R_beta(y) - R_beta(y')) grad ln(pi(y)/pi(y'))
    is a policy gradient on R_beta with the other response as baseline. r(y) - r(y') is
    A(y) - A(y') as in :func:`rebel_loss`; the pair's loss sits on every token of both
    responses (``seq-mean-token-mean``: the mean over pairs).
    """
    partner, seq_log_ratio, reward_gap = _pair_terms(log_prob, ref_log_prob, advantages, mask, group_index)
    residual = reward_gap - settings.beta * (seq_log_ratio - seq_log_ratio[partner])
    loss = (residual**2)[:, None].expand_as(log_prob)
    with torch.no_grad():
        log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
        metrics = {
            **_old_policy_metrics(log_ratio, torch.exp(log_ratio), mask),
            "residual_abs": residual.abs().mean(),
            "seq_log_ratio_to_ref": seq_log_ratio.mean(),
        }
    return loss, metrics
