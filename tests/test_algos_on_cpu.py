"""The algorithm layer's pure tensor functions, checked against hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.algos import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    AdvantageInputs,
    aggregate_loss,
)
from rlkit.algos.advantages import grpo_advantage
from rlkit.algos.kl import kl_k1, kl_k2, kl_k3
from rlkit.algos.masked import group_stats, masked_mean
from rlkit.algos.policy_losses import clipped_surrogate
from rlkit.registry import Registry, UnknownNameError

F64 = torch.float64


def adv_cfg(norm_by_std: bool, eps: float = 1e-6):
    """GRPO's settings (rlkit.algos.advantages.NormalisedSettings)."""
    return ADVANTAGE_ESTIMATORS.make_settings("grpo", norm_by_std=norm_by_std, eps=eps)


def clip_cfg(clip_low: float = 0.2, clip_high: float = 0.2):
    """The clipped surrogate's settings (rlkit.algos.policy_losses.ClipSettings)."""
    return POLICY_LOSSES.make_settings("clipped", clip_low=clip_low, clip_high=clip_high)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# --------------------------------------------------------------------------- registries


def test_registries_hold_the_documented_names():
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    assert LOSS_AGGREGATIONS.names() == [
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
        "token-mean",
    ]
    assert "grpo" in ADVANTAGE_ESTIMATORS and ADVANTAGE_ESTIMATORS.get("grpo") is grpo_advantage
    assert POLICY_LOSSES.get("clipped") is clipped_surrogate


def test_registry_unknown_name_lists_valid_names():
    registry = Registry("widget")
    registry.register("beta")(lambda: 2)
    registry.register("alpha")(lambda: 1)
    with pytest.raises(UnknownNameError) as info:
        registry.get("gamma")
    assert isinstance(info.value, KeyError)
    # plain text (not KeyError's repr quoting), valid names sorted
    assert str(info.value) == "unknown widget 'gamma'; valid: alpha, beta"
    assert list(registry) == ["alpha", "beta"]
    assert "alpha" in registry and "gamma" not in registry


def test_registry_duplicate_registration_raises_and_keeps_the_first():
    registry = Registry("widget")
    first = registry.register("a")(lambda: "first")
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register("a")(lambda: "second")
    assert registry.get("a") is first


def test_registry_decorator_returns_the_function_unchanged():
    registry = Registry("widget")

    def fn(x):
        return x + 1

    assert registry.register("inc")(fn) is fn
    assert registry.get("inc")(1) == 2


# --------------------------------------------------------------------------- masked reductions


def test_masked_mean_all_and_per_dim():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # whole: (1 + 2) / 2 = 1.5   (3 and the whole second row are masked)
    close(masked_mean(values, mask), 1.5)
    # per row: row0 (1+2)/2 = 1.5; row1 empty -> 0 (not nan)
    close(masked_mean(values, mask, dim=-1), [1.5, 0.0])
    # per column: col0 1/1 = 1; col1 2/1 = 2; col2 empty -> 0
    close(masked_mean(values, mask, dim=0), [1.0, 2.0, 0.0])


def test_masked_mean_of_empty_mask_is_zero_and_ignores_masked_nan_free_values():
    values = torch.tensor([[100.0, -7.0]])
    close(masked_mean(values, torch.zeros(1, 2)), 0.0)
    # a bool mask works too: only -7 counts
    close(masked_mean(values, torch.tensor([[False, True]])), -7.0)


def test_group_stats_hand_values_with_unsorted_ids_and_a_group_of_one():
    scores = torch.tensor([1.0, 3.0, 0.0, 5.0, 2.0, 7.0])
    groups = torch.tensor([9, 4, 9, 4, 9, 2])
    mean, std, size = group_stats(scores, groups)
    # group 9: {1, 0, 2}: mean 1; squared deviations 0 + 1 + 1 = 2; unbiased var 2/2 = 1; std 1
    # group 4: {3, 5}:    mean 4; squared deviations 1 + 1 = 2;     unbiased var 2/1 = 2; std sqrt(2)
    # group 2: {7}:       mean 7; a group of one has std 0
    close(mean, [1.0, 4.0, 1.0, 4.0, 1.0, 7.0])
    close(std, [1.0, math.sqrt(2), 1.0, math.sqrt(2), 1.0, 0.0])
    close(size, [3.0, 2.0, 3.0, 2.0, 3.0, 1.0])
    assert mean.dtype == F64  # statistics are taken in float64


# --------------------------------------------------------------------------- GRPO advantage


def grpo_inputs(scores=(1.0, 0.0, 2.0, 3.0, 5.0, 7.0)):
    """Six samples, T = 3, rewards on the last response token; junk on padding."""
    response_mask = torch.tensor(
        [
            [1, 1, 1],
            [1, 0, 0],
            [1, 1, 0],
            [1, 1, 1],
            [1, 0, 0],
            [1, 1, 0],
        ]
    )
    token_rewards = torch.full((6, 3), 100.0)  # padding positions hold junk that must be ignored
    for i, length in enumerate(response_mask.sum(-1).tolist()):
        token_rewards[i, :length] = 0.0
        token_rewards[i, length - 1] = scores[i]
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    return AdvantageInputs(token_rewards=token_rewards, response_mask=response_mask, group_index=groups)


def test_advantage_inputs_scores_ignore_padding():
    close(grpo_inputs().scores, [1.0, 0.0, 2.0, 3.0, 5.0, 7.0])


def test_grpo_advantage_normalised_by_std_hand_values():
    inputs = grpo_inputs()
    eps = 1e-6
    advantages, returns = grpo_advantage(inputs, adv_cfg(True, eps))
    # group 0: scores {1, 0, 2}, mean 1, std 1      -> (0, -1, 1) / (1 + eps)
    # group 1: scores {3, 5},    mean 4, std sqrt 2 -> (-1, 1) / (sqrt 2 + eps)
    # group 2: score {7} alone, mean 7              -> 0 / (0 + eps) = 0
    per_sample = [0.0, -1 / (1 + eps), 1 / (1 + eps), -1 / (math.sqrt(2) + eps), 1 / (math.sqrt(2) + eps), 0.0]
    expected = torch.tensor(per_sample)[:, None] * inputs.response_mask
    close(advantages, expected)
    assert advantages.dtype == torch.float32
    assert torch.equal(returns, advantages)


def test_grpo_advantage_without_std_is_group_centred_reward():
    inputs = grpo_inputs()
    advantages, _ = grpo_advantage(inputs, adv_cfg(False))
    # r - mean(group): group0 (1-1, 0-1, 2-1); group1 (3-4, 5-4); group2 (7-7)
    expected = torch.tensor([0.0, -1.0, 1.0, -1.0, 1.0, 0.0])[:, None] * inputs.response_mask
    close(advantages, expected)


def test_grpo_advantage_broadcasts_only_on_response_tokens():
    inputs = grpo_inputs()
    advantages, _ = grpo_advantage(inputs, adv_cfg(False))
    mask = inputs.response_mask.bool()
    assert torch.all(advantages[~mask] == 0)
    # every response token of a sample carries that sample's advantage: sample 2 (length 2) -> +1, +1, then 0
    close(advantages[2], [1.0, 1.0, 0.0])
    close(advantages[3], [-1.0, -1.0, -1.0])


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_group_of_one_gets_zero_advantage(norm):
    inputs = AdvantageInputs(
        token_rewards=torch.tensor([[0.0, 3.5], [0.0, -2.0]]),
        response_mask=torch.ones(2, 2),
        group_index=torch.tensor([0, 1]),  # two groups of one
    )
    advantages, _ = grpo_advantage(inputs, adv_cfg(norm))
    assert torch.equal(advantages, torch.zeros(2, 2))


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_all_equal_rewards_give_zero_advantage(norm):
    inputs = AdvantageInputs(
        token_rewards=torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]),
        response_mask=torch.ones(4, 2),
        group_index=torch.tensor([0, 0, 0, 0]),
    )
    advantages, _ = grpo_advantage(inputs, adv_cfg(norm))
    # mean 1, std 0: (1 - 1) / (0 + eps) = 0 exactly; no nan from 0/0
    assert torch.isfinite(advantages).all()
    assert torch.equal(advantages, torch.zeros(4, 2))


def test_grpo_advantage_is_invariant_to_reward_shift_and_scale_when_normalised():
    inputs = grpo_inputs()
    scaled = grpo_inputs([10 * r + 3 for r in (1.0, 0.0, 2.0, 3.0, 5.0, 7.0)])
    close(scaled.scores, [13.0, 3.0, 23.0, 33.0, 53.0, 73.0])
    # (r - mean) / std is unchanged by r -> 10 r + 3 (up to the tiny eps; group 2 is alone and stays 0)
    a, _ = grpo_advantage(inputs, adv_cfg(True, 1e-9))
    b, _ = grpo_advantage(scaled, adv_cfg(True, 1e-9))
    close(a, b, atol=1e-5)
    # without the std the scale survives: group-centred rewards are 10x
    c, _ = grpo_advantage(inputs, adv_cfg(False))
    d, _ = grpo_advantage(scaled, adv_cfg(False))
    close(d, 10 * c, atol=1e-5)


def test_grpo_advantage_has_no_gradient_and_accepts_a_float_mask():
    inputs = grpo_inputs()
    rewards = inputs.token_rewards.clone().requires_grad_(True)
    float_inputs = AdvantageInputs(rewards, inputs.response_mask.float(), inputs.group_index)
    advantages, _ = grpo_advantage(float_inputs, adv_cfg(False))
    assert not advantages.requires_grad
    close(advantages[:, 0], [0.0, -1.0, 1.0, -1.0, 1.0, 0.0])


# --------------------------------------------------------------------------- KL estimators

LN2 = math.log(2.0)


def kl_pair():
    # log_ratio = log_prob - ref_log_prob = (0, ln 2, -ln 2)
    log_prob = torch.tensor([-1.0, -1.0 + LN2, -1.0 - LN2], dtype=F64)
    ref_log_prob = torch.tensor([-1.0, -1.0, -1.0], dtype=F64)
    return log_prob, ref_log_prob


def test_kl_k1_hand_values():
    close(kl_k1(*kl_pair()), [0.0, LN2, -LN2])  # can be negative


def test_kl_k2_hand_values():
    # 0.5 * (0, ln2, -ln2)**2 = (0, 0.2402265, 0.2402265)
    close(kl_k2(*kl_pair()), [0.0, 0.5 * LN2**2, 0.5 * LN2**2])
    assert abs(0.5 * LN2**2 - 0.2402265) < 1e-6


def test_kl_k3_hand_values():
    # exp(-x) + x - 1 for x = log_ratio:
    #   x = 0     -> 1 + 0 - 1 = 0
    #   x = ln 2  -> 1/2 + 0.693147 - 1 = 0.193147
    #   x = -ln 2 -> 2 - 0.693147 - 1 = 0.306853
    close(kl_k3(*kl_pair()), [0.0, 0.5 + LN2 - 1, 2 - LN2 - 1])


def test_kl_k3_is_nonnegative_and_zero_only_when_equal():
    generator = torch.Generator().manual_seed(0)
    log_prob = torch.randn(64, 16, generator=generator, dtype=F64) * 3
    ref = torch.randn(64, 16, generator=generator, dtype=F64) * 3
    assert (kl_k3(log_prob, ref) >= 0).all()
    assert (kl_k3(log_prob, ref) > 0).all()  # random pairs are never equal
    assert torch.equal(kl_k3(ref, ref), torch.zeros_like(ref))


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_every_kl_estimator_is_zero_when_policies_agree(name):
    log_prob = torch.log(torch.tensor([[0.1, 0.3, 0.6]]))
    assert torch.equal(KL_ESTIMATORS.get(name)(log_prob, log_prob.clone()), torch.zeros(1, 3))


def test_kl_k1_and_k3_are_unbiased_for_exact_kl_on_a_categorical():
    # pi = (0.5, 0.25, 0.25), pi_ref = (0.25, 0.25, 0.5)
    # KL(pi || pi_ref) = 0.5 ln 2 + 0.25 ln 1 + 0.25 ln 0.5 = 0.25 ln 2
    pi = torch.tensor([0.5, 0.25, 0.25], dtype=F64)
    ref = torch.tensor([0.25, 0.25, 0.5], dtype=F64)
    exact = 0.25 * LN2
    for estimator in (kl_k1, kl_k3):
        expectation = (pi * estimator(pi.log(), ref.log())).sum()  # E_{y ~ pi}[k(y)]
        close(expectation, exact, atol=1e-12)
    # k2 is biased: E[0.5 log_ratio^2] = 0.5 * (0.5 ln2^2 + 0 + 0.25 ln2^2) = 0.375 ln2^2
    close((pi * kl_k2(pi.log(), ref.log())).sum(), 0.375 * LN2**2, atol=1e-12)


def test_kl_k3_stays_finite_for_extreme_log_ratios():
    log_prob = torch.tensor([0.0, -200.0])
    ref = torch.tensor([-200.0, 0.0])
    out = kl_k3(log_prob, ref)
    assert torch.isfinite(out).all()
    # clamped to |x| <= 20: x = 200 -> e^-20 + 20 - 1; x = -200 -> e^20 - 20 - 1
    expected = torch.tensor([math.exp(-20) + 19, math.exp(20) - 21])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- loss aggregation

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_token_mean_hand_value():
    # (1 + 2 + 4) / 3 tokens = 7/3
    close(aggregate_loss(LOSS, MASK, "token-mean"), 7 / 3)


def test_seq_mean_token_mean_hand_value():
    # seq0: (1 + 2)/2 = 1.5; seq1: 4/1 = 4; mean over 2 seqs = 2.75
    close(aggregate_loss(LOSS, MASK, "seq-mean-token-mean"), 2.75)


def test_seq_mean_token_sum_hand_value():
    # seq sums 3 and 4; mean over 2 seqs = 3.5
    close(aggregate_loss(LOSS, MASK, "seq-mean-token-sum"), 3.5)


def test_seq_mean_token_sum_norm_hand_value():
    # (3 + 4) / (2 seqs * horizon); horizon defaults to T = 3 -> 7/6; with horizon 7 -> 7/14 = 0.5
    close(aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm"), 7 / 6)
    close(aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", horizon=7), 0.5)


def test_aggregation_uses_given_global_counts():
    # counts from elsewhere (a bigger minibatch): token-mean 7 / 10; seq-mean modes divide by 5 seqs
    close(aggregate_loss(LOSS, MASK, "token-mean", num_tokens=10, num_seqs=5, horizon=3), 0.7)
    close(aggregate_loss(LOSS, MASK, "seq-mean-token-mean", num_tokens=10, num_seqs=5, horizon=3), (1.5 + 4) / 5)
    close(aggregate_loss(LOSS, MASK, "seq-mean-token-sum", num_tokens=10, num_seqs=5, horizon=3), 7 / 5)
    close(aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", num_tokens=10, num_seqs=5, horizon=4), 7 / 20)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_aggregation_ignores_masked_values_and_survives_empty_mask(mode):
    junk = LOSS.clone()
    junk[MASK == 0] = 1e6
    close(aggregate_loss(junk, MASK, mode), aggregate_loss(LOSS, MASK, mode))
    # an all-empty mask gives 0, not nan (counts are clamped to >= 1)
    assert aggregate_loss(LOSS, torch.zeros_like(MASK), mode).item() == 0.0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_micro_batches_with_global_counts_sum_to_full_batch(mode):
    loss = torch.tensor(
        [
            [0.5, -1.0, 2.0, 3.0],
            [1.5, 0.0, 0.0, 0.0],
            [-2.0, 4.0, 1.0, 0.0],
            [3.0, 3.0, 3.0, 3.0],
            [1.0, 0.0, 0.0, 0.0],
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    full = aggregate_loss(loss, mask, mode)
    counts = dict(num_tokens=float(mask.sum()), num_seqs=mask.shape[0], horizon=mask.shape[1])
    parts = [aggregate_loss(loss[rows], mask[rows], mode, **counts) for rows in (slice(0, 2), slice(2, 5))]
    close(parts[0] + parts[1], full)


def test_micro_batches_with_local_counts_do_not_sum_to_token_mean():
    # the reason global counts exist: micro-batch token means averaged != full token mean
    # rows [0] and [1] of MASK: (1 + 2)/2 = 1.5 and 4/1 = 4 -> average 2.75, but the full token mean is 7/3
    local = [aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], "token-mean") for i in range(2)]
    close((local[0] + local[1]) / 2, 2.75)
    assert abs((local[0] + local[1]).item() / 2 - 7 / 3) > 0.1


def test_aggregation_unknown_mode_lists_valid_ones():
    with pytest.raises(
        UnknownNameError, match="valid: seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm, token-mean"
    ):
        aggregate_loss(LOSS, MASK, "token-median")


# --------------------------------------------------------------------------- clipped surrogate


def test_clipped_surrogate_at_ratio_one_is_minus_advantage():
    log_prob = torch.tensor([[-1.0, -2.0, -0.5]])
    advantages = torch.tensor([[0.7, -1.3, 2.0]])
    loss, metrics = clipped_surrogate(log_prob, log_prob.clone(), advantages, torch.ones(1, 3), clip_cfg())
    close(loss, -advantages)
    close(metrics["clip_frac"], 0.0)
    close(metrics["ratio_mean"], 1.0)
    close(metrics["approx_kl_old"], 0.0)


def surrogate_case(ratios, advantages, cfg, mask=None):
    """Loss, metrics and d loss / d log_prob for the given ratios (old_log_prob = 0)."""
    log_prob = torch.tensor([ratios], dtype=F64).log().requires_grad_(True)
    advantages = torch.tensor([advantages], dtype=F64)
    mask = torch.ones_like(advantages) if mask is None else torch.tensor([mask], dtype=F64)
    loss, metrics = clipped_surrogate(log_prob, torch.zeros_like(log_prob), advantages, mask, cfg)
    loss.sum().backward()
    return loss.detach()[0], metrics, log_prob.grad[0]


def test_clipped_surrogate_asymmetric_bounds_hand_values():
    cfg = clip_cfg(clip_low=0.2, clip_high=0.28)  # ratio kept in [0.8, 1.28]
    ratios = [1.25, 1.30, 0.70, 0.70, 1.30, 0.85]
    advs = [1.0, 1.0, -1.0, 1.0, -1.0, -2.0]
    loss, metrics, grad = surrogate_case(ratios, advs, cfg)
    # loss = -min(r A, clip(r, 0.8, 1.28) A)
    #   r=1.25, A=+1: 1.25 inside (would be clipped with a symmetric 0.2) -> -1.25
    #   r=1.30, A=+1: min(1.30, 1.28) = 1.28                                -> -1.28  (clipped high)
    #   r=0.70, A=-1: min(-0.70, -0.80) = -0.80                             -> +0.80  (clipped low)
    #   r=0.70, A=+1: min(0.70, 0.80) = 0.70 (pessimistic: no clip)         -> -0.70
    #   r=1.30, A=-1: min(-1.30, -1.28) = -1.30 (pessimistic: no clip)      -> +1.30
    #   r=0.85, A=-2: inside the bounds                                     -> +1.70
    close(loss, [-1.25, -1.28, 0.80, -0.70, 1.30, 1.70], atol=1e-12)
    # d loss / d log_prob = -A r where unclipped (d r / d log_prob = r), 0 where clipped
    close(grad, [-1.25, 0.0, 0.0, -0.70, 1.30, 1.70], atol=1e-12)
    # clip_frac: 2 of 6 clipped; low: r < 0.8 with A < 0 -> 1/6; high: r > 1.28 with A > 0 -> 1/6
    close(metrics["clip_frac"], 2 / 6, atol=1e-12)
    close(metrics["clip_frac_low"], 1 / 6, atol=1e-12)
    close(metrics["clip_frac_high"], 1 / 6, atol=1e-12)
    close(metrics["ratio_mean"], sum(ratios) / 6, atol=1e-12)
    # approx_kl_old = mean(0.5 log(r)^2)
    close(metrics["approx_kl_old"], sum(0.5 * math.log(r) ** 2 for r in ratios) / 6, atol=1e-12)


def test_clipped_surrogate_symmetric_bounds_clip_what_asymmetric_ones_keep():
    # r = 1.25, A = +1: clip_high = 0.2 caps at 1.2 (loss -1.2, no gradient); clip_high = 0.28 does not
    loss_sym, metrics_sym, grad_sym = surrogate_case([1.25], [1.0], clip_cfg(0.2, 0.2))
    loss_asym, metrics_asym, grad_asym = surrogate_case([1.25], [1.0], clip_cfg(0.2, 0.28))
    close(loss_sym, [-1.2], atol=1e-12)
    close(grad_sym, [0.0], atol=1e-12)
    close(metrics_sym["clip_frac_high"], 1.0)
    close(loss_asym, [-1.25], atol=1e-12)
    close(grad_asym, [-1.25], atol=1e-12)
    close(metrics_asym["clip_frac_high"], 0.0)
    # and the low bound is independent of clip_high: r = 0.75, A = -1 is clipped at 0.8 by clip_low 0.2 ...
    loss_low, _, grad_low = surrogate_case([0.75], [-1.0], clip_cfg(0.2, 0.28))
    close(loss_low, [0.8], atol=1e-12)
    close(grad_low, [0.0], atol=1e-12)
    # ... but not by clip_low 0.3 (bound 0.7)
    loss_wide, _, grad_wide = surrogate_case([0.75], [-1.0], clip_cfg(0.3, 0.28))
    close(loss_wide, [0.75], atol=1e-12)
    close(grad_wide, [0.75], atol=1e-12)


def test_clip_metrics_ignore_masked_tokens():
    # token 2 is clipped high but masked out; token 1 (r = 0.5, A = -1) is clipped low and counts
    _, metrics, _ = surrogate_case([1.0, 0.5, 2.0, 1.0], [1.0, -1.0, 1.0, 1.0], clip_cfg(), mask=[1, 1, 0, 1])
    # 3 unmasked tokens, 1 clipped (low)
    close(metrics["clip_frac"], 1 / 3, atol=1e-12)
    close(metrics["clip_frac_low"], 1 / 3, atol=1e-12)
    close(metrics["clip_frac_high"], 0.0, atol=1e-12)
    close(metrics["ratio_mean"], (1.0 + 0.5 + 1.0) / 3, atol=1e-12)
    assert not any(m.requires_grad for m in metrics.values())


def test_one_epoch_clipped_gradient_equals_reinforce_with_group_mean_baseline():
    """With old_log_prob = log_prob.detach() the ratio is 1, nothing is clipped and
    d(-r A)/d log_prob = -A, so the clipped loss's gradient is REINFORCE's:
    -(1/B) sum_i (R_i - mean_group R) sum_t grad log pi(y_it)."""
    generator = torch.Generator().manual_seed(0)
    batch, horizon, vocab = 4, 3, 5
    logits = torch.randn(batch, horizon, vocab, generator=generator, dtype=F64, requires_grad=True)
    tokens = torch.randint(vocab, (batch, horizon), generator=generator)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    rewards = torch.tensor([1.0, 0.0, 3.0, 5.0])  # groups {0, 1} and {2, 3}
    groups = torch.tensor([0, 0, 1, 1])
    token_rewards = torch.zeros(batch, horizon)
    token_rewards[torch.arange(batch), mask.sum(-1) - 1] = rewards

    def log_probs():
        return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]

    advantages, _ = grpo_advantage(AdvantageInputs(token_rewards, mask, groups), adv_cfg(False))
    # group means 0.5 and 4: advantages (0.5, -0.5, -1, 1) on every response token
    close(advantages[:, 0], [0.5, -0.5, -1.0, 1.0])

    log_prob = log_probs()
    loss, metrics = clipped_surrogate(log_prob, log_prob.detach(), advantages.to(F64), mask, clip_cfg(0.2, 0.28))
    aggregate_loss(loss, mask, "seq-mean-token-sum").backward()
    ppo_grad, logits.grad = logits.grad.clone(), None
    close(metrics["clip_frac"], 0.0)

    baseline = torch.tensor([0.5, 0.5, 4.0, 4.0], dtype=F64)
    reinforce = -((rewards.to(F64) - baseline) * (log_probs() * mask).sum(-1)).sum() / batch
    reinforce.backward()
    torch.testing.assert_close(ppo_grad, logits.grad, atol=1e-12, rtol=0)
    assert ppo_grad.abs().sum() > 0  # not trivially zero


def test_one_epoch_clipped_gradient_wrt_log_prob_is_minus_advantage():
    log_prob = torch.tensor([[-0.3, -1.7], [-2.2, -0.1]], requires_grad=True)
    advantages = torch.tensor([[2.0, 2.0], [-0.5, -0.5]])
    loss, _ = clipped_surrogate(log_prob, log_prob.detach(), advantages, torch.ones(2, 2), clip_cfg())
    loss.sum().backward()
    # d(-r A)/d log_prob = -A r = -A at r = 1
    close(log_prob.grad, -advantages)


def test_zero_advantage_is_never_counted_as_clipped():
    # A = 0: loss -min(0, 0) = 0 and no gradient whatever the ratio; no clip metric counts it
    loss, metrics, grad = surrogate_case([0.5, 1.5], [0.0, 0.0], clip_cfg())
    close(loss, [0.0, 0.0], atol=0)
    close(grad, [0.0, 0.0], atol=0)
    for name in ("clip_frac", "clip_frac_low", "clip_frac_high"):
        close(metrics[name], 0.0, atol=0)
