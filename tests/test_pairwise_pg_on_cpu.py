"""The pairwise policy-gradient losses P3O and CoPG, against hand-worked values on two
pairs with padding, and their limiting cases (ratio 1, equal rewards, the optimum)."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.algos import POLICY_LOSSES, aggregate_loss
from rlkit.algos.policy_losses import clipped_surrogate, copg_loss, optional_inputs, p3o_loss

F64 = torch.float64


def p3o(**changes):
    """P3O's settings (P3OSettings: its defaults, the paper's, with ``changes``)."""
    return POLICY_LOSSES.make_settings("p3o", **changes)


def copg(**changes):
    """CoPG's settings (CoPGSettings)."""
    return POLICY_LOSSES.make_settings("copg", **changes)


def clipped(**changes):
    """The clipped surrogate's settings (ClipSettings)."""
    return POLICY_LOSSES.make_settings("clipped", **changes)


def close(actual, expected, atol=1e-12):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# Two pairs, rows shuffled as in a micro-batch: groups 1, 0, 1, 0. Padding holds wild values.
GROUPS = torch.tensor([1, 0, 1, 0])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
OLD = torch.zeros(4, 3, dtype=F64)
# sequence log-ratios to OLD: 0.25, 0.06, -0.05, -0.06
NEW = torch.tensor([[0.2, 0.05, 9.0], [0.02, 0.02, 0.02], [-0.05, 5.0, 5.0], [-0.1, 0.04, -7.0]], dtype=F64)
# group-centred rewards: pair 1 has rewards (2, 1), pair 0 has (0, 3); 100 on padding
ADV = torch.where(MASK.bool(), torch.tensor([0.5, -1.5, -0.5, 1.5], dtype=F64)[:, None], torch.tensor(100.0, dtype=F64))


def run(fn, new, old, advantages, c, **extras):
    """Per-row loss (the value on the first token), metrics and d(sum of row losses)/d log_prob."""
    log_prob = new.clone().requires_grad_(True)
    loss, metrics = fn(log_prob, old, advantages, MASK, c, group_index=GROUPS, **extras)
    loss[:, 0].sum().backward()
    return loss.detach(), metrics, log_prob.grad * MASK


def test_registered_with_their_inputs_and_defaults():
    assert POLICY_LOSSES.get("p3o") is p3o_loss and POLICY_LOSSES.get("copg") is copg_loss
    assert optional_inputs(p3o_loss) == ("group_index",)
    assert optional_inputs(copg_loss) == ("ref_log_prob", "group_index")
    defaults = p3o()
    assert (defaults.clipping, defaults.weight_cap, defaults.clip_low, defaults.clip_high) == ("joint", 10.0, 0.2, 0.2)
    assert copg().beta == 0.1


# --------------------------------------------------------------------------- P3O


def test_p3o_joint_hand_values():
    loss, metrics, grad = run(p3o_loss, NEW, OLD, ADV, p3o(clipping="joint", clip_low=0.2, clip_high=0.2))
    # every token of a row carries the row's value
    assert torch.equal(loss, loss[:, :1].expand_as(loss))
    # pair 1 (rows 0, 2): d = 0.25 - (-0.05) = 0.3, g = 2 - 1 = 1, w = exp(0.25 - 0.05) = e^0.2;
    #   min(0.3 * 1, clip(0.3) * 1) = 0.2 (clipped): loss -w * 0.2 / 2; row 2 sees d = -0.3, g = -1: the same
    # pair 0 (rows 1, 3): d = 0.06 - (-0.06) = 0.12 (inside), g = 0 - 3 = -3, w = 1: loss -(0.12 * -3) / 2 = 0.18
    w = math.exp(0.2)
    close(loss[:, 0], [-0.1 * w, 0.18, -0.1 * w, 0.18])
    # pair 0: row losses -(l1 - l3) g / 2 and -(l3 - l1)(-g) / 2 give d/dl1 = -g = 3 on every token; pair 1 is clipped
    close(grad, torch.tensor([[0.0, 0, 0], [3, 3, 3], [0, 0, 0], [-3, -3, 0]], dtype=F64) * MASK)
    close(metrics["clip_frac"], 0.5)
    close(metrics["pair_weight_mean"], (2 * w + 2) / 4)


def test_p3o_separate_hand_values():
    loss, metrics, grad = run(p3o_loss, NEW, OLD, ADV, p3o(clipping="separate", clip_low=0.2, clip_high=0.2))
    # each row: -w min(l g, clip(l) g) with its own log-ratio l and gap g (twice its term of the pair's sum)
    #   row 0: l = 0.25, g = 1  -> clipped at 0.2: -0.2 w, no gradient
    #   row 2: l = -0.05, g = -1 -> 0.05:         -0.05 w, gradient -w g = w
    #   row 1: l = 0.06, g = -3 -> -0.18:          0.18,   gradient 3
    #   row 3: l = -0.06, g = 3 -> -0.18:          0.18,   gradient -3
    w = math.exp(0.2)
    close(loss[:, 0], [-0.2 * w, 0.18, -0.05 * w, 0.18])
    close(grad, torch.tensor([[0.0, 0, 0], [3, 3, 3], [w, 0, 0], [-3, -3, 0]], dtype=F64) * MASK)
    close(metrics["clip_frac"], 0.25)


@pytest.mark.parametrize("variant", ["joint", "separate"])
def test_p3o_at_ratio_one_is_reinforce_with_the_reward_difference(variant):
    # on-policy (rho = 1) the pair objective's gradient is Theorem 1's (r1 - r2) grad ln(pi1/pi2) / 2 per pair,
    # i.e. REINFORCE with advantage r(y) - r(y'): the clipped surrogate at ratio 1 with a per-sequence token sum
    generator = torch.Generator().manual_seed(0)
    log_prob = -torch.rand(4, 3, generator=generator, dtype=F64)
    gap = torch.tensor([1.0, -3.0, -1.0, 3.0], dtype=F64)[:, None] * MASK
    lp = log_prob.clone().requires_grad_(True)
    loss, _ = p3o_loss(lp, log_prob, ADV, MASK, p3o(clipping=variant), group_index=GROUPS)
    close(loss, torch.zeros_like(loss))
    aggregate_loss(loss, MASK, "seq-mean-token-mean").backward()
    reference = log_prob.clone().requires_grad_(True)
    ppo, _ = clipped_surrogate(reference, log_prob, gap, MASK, clipped())
    aggregate_loss(ppo, MASK, "seq-mean-token-sum").backward()
    close(lp.grad * MASK, reference.grad * MASK)


@pytest.mark.parametrize("variant", ["joint", "separate"])
def test_p3o_equal_rewards_give_no_loss_and_no_gradient_off_policy(variant):
    loss, _, grad = run(p3o_loss, NEW, OLD, torch.full_like(ADV, 0.7), p3o(clipping=variant))
    close(loss, torch.zeros_like(loss))
    close(grad, torch.zeros_like(grad))


def test_p3o_pair_weight_is_clipped_into_one_over_c_and_c():
    groups, mask = torch.tensor([0, 0, 1, 1]), torch.ones(4, 1)
    old = torch.zeros(4, 1, dtype=F64)
    # pair 0: log-ratios 2.55, 2.45 (rho1 rho2 = e^5 -> c = 10); pair 1: -2.5, -2.5 (e^-5 -> 1/c)
    new = torch.tensor([[2.55], [2.45], [-2.5], [-2.5]], dtype=F64)
    advantages = torch.tensor([[1.0], [-1.0], [0.5], [-0.5]], dtype=F64)  # gaps 2, -2, 1, -1
    loss, metrics = p3o_loss(new, old, advantages, mask, p3o(weight_cap=10.0), group_index=groups)
    # pair 0: d = 0.1 inside, loss -10 * 0.1 * 2 / 2 = -1; pair 1: d = 0, loss 0
    close(loss[:, 0], [-1.0, -1.0, 0.0, 0.0])
    close(metrics["pair_weight_mean"], (10 + 10 + 0.1 + 0.1) / 4)
    unweighted, metrics = p3o_loss(new, old, advantages, mask, p3o(weight_cap=1.0), group_index=groups)
    close(unweighted[:, 0], [-0.1, -0.1, 0.0, 0.0])
    close(metrics["pair_weight_mean"], 1.0)


# --------------------------------------------------------------------------- CoPG

REF = torch.tensor(
    [[0.1, 0.0, 50.0], [0.0, 0.0, 0.0], [0.0, -50.0, 50.0], [0.0, 0.0, 50.0]], dtype=F64
)  # padding ignored


def test_copg_hand_values():
    # sequence log-ratios to REF: 0.15, 0.06, -0.05, -0.06; beta = 0.5; OLD (all 1s) must not enter the loss
    loss, metrics, grad = run(copg_loss, NEW, torch.ones_like(OLD), ADV, copg(beta=0.5), ref_log_prob=REF)
    # pair 1: R_b(y0) - R_b(y2) = (2 - 1) - 0.5 (0.15 + 0.05) = 0.9 -> 0.81 on both rows
    # pair 0: (0 - 3) - 0.5 (0.06 + 0.06) = -3.06 -> 9.3636 on both rows
    close(loss[:, 0], [0.81, 9.3636, 0.81, 9.3636])
    # d/dl0 of res^2 + (-res)^2 = 2 * 2 res * (-beta) = -1.8; d/dl1 = -2 * (-3.06) = 6.12
    close(grad, torch.tensor([[-1.8, -1.8, 0], [6.12, 6.12, 6.12], [1.8, 0, 0], [-6.12, -6.12, 0]], dtype=F64) * MASK)
    close(metrics["residual_abs"], (0.9 + 3.06) / 2)


def test_copg_at_the_reference_policy_is_reinforce_scaled_by_four_beta():
    # pi = pi_ref: R_beta = r and the gradient is -2 beta (r - r') grad ln(pi(y)/pi(y')) per row,
    # 4 beta times REINFORCE with advantage r(y) - r(y') (CoPG's on-policy, RLOO-like limit)
    generator = torch.Generator().manual_seed(1)
    log_prob = -torch.rand(4, 3, generator=generator, dtype=F64)
    gap = torch.tensor([1.0, -3.0, -1.0, 3.0], dtype=F64)[:, None] * MASK
    lp = log_prob.clone().requires_grad_(True)
    loss, _ = copg_loss(lp, log_prob, ADV, MASK, copg(beta=0.3), ref_log_prob=log_prob, group_index=GROUPS)
    aggregate_loss(loss, MASK, "seq-mean-token-mean").backward()
    reference = log_prob.clone().requires_grad_(True)
    ppo, _ = clipped_surrogate(reference, log_prob, gap, MASK, clipped())
    aggregate_loss(ppo, MASK, "seq-mean-token-sum").backward()
    close(lp.grad * MASK, 4 * 0.3 * reference.grad * MASK)


def test_copg_is_zero_at_the_regularised_optimum_and_pulls_equal_rewards_together():
    # beta ln(pi/pi_ref)(y) - beta ln(pi/pi_ref)(y') = r(y) - r(y'): pi proportional to pi_ref exp(r / beta), loss 0
    beta = 0.5
    # log-ratios 2, -6, 0, 0 (padding wild): 0.5 (2 - 0) = 1 = 2 - 1 and 0.5 (-6 - 0) = -3 = 0 - 3
    optimum = torch.tensor([[1.5, 0.5, 9.0], [-2.0, -2.0, -2.0], [0.0, 7.0, 7.0], [0.5, -0.5, 3.0]], dtype=F64)
    loss, _, grad = run(copg_loss, optimum, OLD, ADV, copg(beta=beta), ref_log_prob=torch.zeros_like(REF))
    close(loss, torch.zeros_like(loss))
    close(grad, torch.zeros_like(grad))
    # equal rewards: loss beta^2 (l - l')^2, a pull of the two log-ratios toward each other
    loss, _, grad = run(copg_loss, NEW, OLD, torch.zeros_like(ADV), copg(beta=beta), ref_log_prob=torch.zeros_like(REF))
    close(loss[:, 0], [0.25 * 0.3**2, 0.25 * 0.12**2, 0.25 * 0.3**2, 0.25 * 0.12**2])
    # d/dl of 2 beta^2 (l - l')^2 = 4 beta^2 (l - l'): descent lowers the higher log-ratio and raises the lower one
    close(grad, torch.tensor([[0.3, 0.3, 0], [0.12, 0.12, 0.12], [-0.3, 0, 0], [-0.12, -0.12, 0]], dtype=F64) * MASK)


def test_pairwise_losses_need_exactly_two_rows_per_group():
    bad = torch.tensor([0, 0, 0, 1])
    with pytest.raises(ValueError, match="exactly two"):
        p3o_loss(NEW, OLD, ADV, MASK, p3o(), group_index=bad)
    with pytest.raises(ValueError, match="exactly two"):
        copg_loss(NEW, OLD, ADV, MASK, copg(), ref_log_prob=REF, group_index=bad)


# --------------------------------------------------------------------------- presets and validation


def test_preset_values(compose_config):
    p3o_preset = compose_config("algo=p3o").algo
    assert (p3o_preset.policy_loss.name, p3o_preset.policy_loss.clipping, p3o_preset.group_size) == ("p3o", "joint", 2)
    assert (p3o_preset.advantage.name, p3o_preset.advantage.norm_by_std) == ("grpo", False)
    assert (p3o_preset.kl.placement, p3o_preset.kl.estimator, p3o_preset.loss_agg) == (
        "reward",
        "k1",
        "seq-mean-token-mean",
    )
    copg_preset = compose_config("algo=copg").algo
    assert (copg_preset.policy_loss.name, copg_preset.group_size, copg_preset.kl.coef) == ("copg", 2, 0.0)
    assert (copg_preset.advantage.name, copg_preset.advantage.norm_by_std) == ("grpo", False)
