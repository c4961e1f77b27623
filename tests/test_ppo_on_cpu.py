"""PPO's pieces: GAE, value losses, the adaptive KL controller, score normalisation,
the value head, and PPO's first-minibatch ratio, against hand-worked values."""

from __future__ import annotations

import pytest
import torch

from rlkit.algos import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, VALUE_LOSSES, AdvantageInputs
from rlkit.algos.gae import gae_advantage
from rlkit.algos.kl import adaptive_kl_coef
from rlkit.algos.masked import explained_variance
from rlkit.algos.policy_losses import clipped_surrogate
from rlkit.algos.reward_norm import RunningMoments, batch_moments, normalise_scores
from rlkit.algos.value_losses import clipped_value_loss, mse_value_loss


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# Two responses: lengths 3 and 2 (horizon 3); padding carries junk that must be ignored.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 100.0]])
VALUES = torch.tensor([[0.5, 0.2, 0.4], [1.0, -1.0, 100.0]])


def gae(gamma, lam, norm=False):
    inputs = AdvantageInputs(REWARDS, MASK, torch.tensor([0, 1]), values=VALUES)
    return gae_advantage(inputs, ADVANTAGE_ESTIMATORS.make_settings("gae", gamma=gamma, lam=lam, norm_by_std=norm))


def test_gae_is_registered():
    assert ADVANTAGE_ESTIMATORS.get("gae") is gae_advantage
    assert VALUE_LOSSES.get("clipped") is clipped_value_loss and VALUE_LOSSES.get("mse") is mse_value_loss


def test_gae_with_gamma_lambda_one_is_returns_minus_values():
    advantages, returns = gae(1.0, 1.0)
    # returns-to-go: [1, 1, 1] and [2.5, 2, -]; minus values
    close(advantages, [[0.5, 0.8, 0.6], [1.5, 3.0, 0.0]])
    close(returns, [[1.0, 1.0, 1.0], [2.5, 2.0, 0.0]])


def test_gae_hand_values_gamma_lambda_half():
    advantages, returns = gae(0.5, 0.5)
    # row 0: deltas = [0 + .5*.2 - .5, 0 + .5*.4 - .2, 1 - .4] = [-.4, 0, .6]
    #        A2 = .6, A1 = 0 + .25*.6 = .15, A0 = -.4 + .25*.15 = -.3625
    # row 1: deltas = [.5 + .5*(-1) - 1, 2 - (-1)] = [-1, 3]; A1 = 3, A0 = -1 + .25*3 = -.25
    close(advantages, [[-0.3625, 0.15, 0.6], [-0.25, 3.0, 0.0]])
    close(returns, [[0.1375, 0.35, 1.0], [0.75, 2.0, 0.0]])


def test_gae_with_lambda_zero_is_the_one_step_td_error():
    advantages, _ = gae(1.0, 0.0)
    close(advantages, [[-0.3, 0.2, 0.6], [-1.5, 3.0, 0.0]])


def test_gae_whitening_gives_zero_mean_unit_std_and_leaves_returns():
    advantages, returns = gae(1.0, 0.95, norm=True)
    tokens = advantages[MASK.bool()].double()
    assert abs(float(tokens.mean())) < 1e-6 and abs(float(tokens.std(unbiased=False)) - 1) < 1e-5
    assert float(advantages[1, 2]) == 0.0
    _, raw_returns = gae(1.0, 0.95)
    close(returns, raw_returns)


def test_gae_without_values_says_what_to_set():
    with pytest.raises(ValueError, match="algo/value_source=critic"):
        gae_advantage(AdvantageInputs(REWARDS, MASK, torch.tensor([0, 1])), ADVANTAGE_ESTIMATORS.make_settings("gae"))


def test_clipped_value_loss_hand_values():
    settings = VALUE_LOSSES.make_settings("clipped", clip=0.2)
    values = torch.tensor([[1.0, 0.0, 0.5]])
    old = torch.tensor([[0.5, 0.1, 0.5]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    loss, metrics = clipped_value_loss(values, old, returns, torch.ones(1, 3), settings)
    # token 0: V moved +.5 -> clipped to .7: max((1-2)^2, (.7-2)^2) = 1.69; token 1: V moved -.1 (inside): (0-1)^2 = 1;
    # token 2: unchanged: .25. Halved.
    close(loss, [[0.845, 0.5, 0.125]])
    assert float(metrics["clip_frac"]) == pytest.approx(1 / 3)
    mse, _ = mse_value_loss(values, old, returns, torch.ones(1, 3), VALUE_LOSSES.make_settings("mse"))
    close(mse, [[0.5, 0.5, 0.125]])


def test_clipped_value_loss_gradient_is_zero_where_clipping_wins():
    values = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss, _ = clipped_value_loss(
        values,
        torch.tensor([[0.5, 0.1]]),
        torch.tensor([[2.0, 1.0]]),
        torch.ones(1, 2),
        VALUE_LOSSES.make_settings("clipped", clip=0.2),
    )
    loss.sum().backward()
    close(values.grad, [[0.0, -1.0]])  # token 0 is clipped (constant), token 1 regresses: d/dV 0.5 (V - 1)^2 = -1


def test_adaptive_kl_controller_hand_values():
    # KL above target: error clipped at +0.2, beta grows by 0.2 * n / horizon
    assert adaptive_kl_coef(0.1, kl=12.0, target=6.0, horizon=10000, num_samples=256) == pytest.approx(
        0.1 * (1 + 0.2 * 256 / 10000)
    )
    # slightly below target: proportional error -0.1
    assert adaptive_kl_coef(0.1, kl=5.4, target=6.0, horizon=100, num_samples=50) == pytest.approx(
        0.1 * (1 - 0.1 * 0.5)
    )
    # at target: unchanged; far below: error clipped at -0.2
    assert adaptive_kl_coef(0.3, kl=6.0, target=6.0, horizon=10, num_samples=10) == pytest.approx(0.3)
    assert adaptive_kl_coef(0.3, kl=0.0, target=6.0, horizon=10, num_samples=10) == pytest.approx(0.3 * 0.8)


def test_running_moments_equal_the_statistics_of_all_batches_seen():
    batches = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0]), torch.tensor([-4.0, 0.5])]
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches).double()
    assert moments.count == 6
    assert moments.mean == pytest.approx(float(everything.mean()))
    assert moments.var == pytest.approx(float(everything.var(unbiased=False)))


def test_normalise_scores_whitens_and_clips():
    scores = torch.tensor([0.0, 1.0, 1.0, 2.0])
    mean, var = batch_moments(scores)
    assert (mean, var) == pytest.approx((1.0, 0.5))
    close(normalise_scores(scores, mean, var, clip=0.0), [-(2**0.5), 0.0, 0.0, 2**0.5], atol=1e-5)
    close(normalise_scores(scores, mean, var, clip=1.0), [-1.0, 0.0, 0.0, 1.0])


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def tiny_model():
    from rlkit.config import TinyArchitecture
    from rlkit.models import build_tiny_model

    corpus = [f"{a}+{b}={a + b}" for a in range(30) for b in range(30)]
    return build_tiny_model(TinyArchitecture(hidden_size=32, intermediate_size=64, vocab_size=64), corpus, 0)


def rollout_batch(tokenizer, model):
    from rlkit.rollout import generate

    torch.manual_seed(0)
    return generate(model, tokenizer, ["1+2=", "13+4="], num_samples=2, max_new_tokens=6)


def test_ppo_ratio_is_one_on_the_first_minibatch(tiny_model):
    """The old log-probs (no grad, computed before the update) and the first minibatch's
    log-probs (train mode, with grad) come from the same weights: ratio 1, nothing clipped."""
    from rlkit.rollout import token_log_probs

    model, tokenizer = tiny_model
    rollout = rollout_batch(tokenizer, model)
    width = rollout.response_ids.shape[1]
    with torch.no_grad():
        old, _ = token_log_probs(model.eval(), rollout.sequences, rollout.attention_mask, width)
    new, _ = token_log_probs(model.train(), rollout.sequences, rollout.attention_mask, width)
    advantages = torch.randn(new.shape) * rollout.response_mask
    loss, metrics = clipped_surrogate(
        new, old, advantages, rollout.response_mask, POLICY_LOSSES.make_settings("clipped")
    )
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(metrics["clip_frac"]) == 0.0
    assert new.requires_grad and loss.requires_grad


def test_value_head_starts_at_zero_and_is_trained_with_the_trunk(tiny_model):
    import copy

    from rlkit.models.value_head import attach_value_head, token_values

    model, tokenizer = tiny_model
    model = copy.deepcopy(model)
    rollout = rollout_batch(tokenizer, model)
    attach_value_head(model)
    width = rollout.response_ids.shape[1]
    values = token_values(model, rollout.sequences, rollout.attention_mask, width)
    assert values.shape == rollout.response_ids.shape and float(values.detach().abs().max()) == 0.0
    values.sum().backward()
    assert model.value_head.weight.grad is not None and float(model.value_head.weight.grad.abs().sum()) > 0


def test_ppo_preset_values(compose_config):
    algo = compose_config("algo=ppo").algo
    assert (
        algo.advantage.name,
        algo.value_source.name,
        algo.value_source.loss.name,
        algo.advantage.lam,
        algo.kl.placement,
    ) == (
        "gae",
        "critic",
        "clipped",
        0.95,
        "reward",
    )
    assert (algo.reward_norm, algo.reward_clip, algo.advantage.norm_by_std) == ("running", 5.0, True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("algo=grpo", "algo/advantage=gae"), "advantage 'gae' reads ['values'], and this value source provides none"),
        (
            ("algo=grpo", "algo/value_source=critic"),
            "algo.value_source.loss is required: choose a value loss with +algo/value_source/loss=<name> (valid: clipped, mse)",
        ),
        (
            ("algo=grpo", "algo/value_source=critic", "+algo/value_source/loss=mse"),
            "advantage 'grpo' reads no values, and this value source provides ['values']",
        ),
        (
            ("algo=ppo", "algo/value_source=head"),
            "algo/value_source=head: unknown option of group algo/value_source; valid: critic, greedy",
        ),
        (("algo=ppo", "algo.advantage.lam=1.5"), "algo.advantage.lam=1.5: must be in"),
        (("algo=ppo", "algo.kl.target=6.0", "algo.kl.coef=0"), "algo.kl.target=6.0: the adaptive controller needs"),
        (("algo=ppo", "algo.reward_norm=global"), "algo.reward_norm='global': must be one of: none, batch, running"),
        (("algo=ppo", "algo.value_source.loss.clip=-1"), "algo.value_source.loss.clip=-1"),
        (("algo=grpo", "algo.value_source.pretrain_steps=3"), "value source 'none' has no setting 'pretrain_steps'"),
        (("algo=rebel", "algo.group_size=4"), "algo.group_size=2"),
        (("algo=apa", "algo.policy_loss.lam=0"), "algo.policy_loss.lam=0.0: must be positive"),
        (("algo=ppo", "algo.critic.type=separate"), "algo preset 'ppo' (loop policy_gradient) has no setting 'critic'"),
    ],
)
def test_validation_rejects_bad_ppo_knobs(config_error, overrides, message):
    assert message in (config_error(*overrides) or "")


def test_apa_loss_hand_values_and_gradient():
    from rlkit.algos.policy_losses import apa_loss

    log_prob = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0]])
    advantages = torch.tensor([[1.0, -0.5]])
    loss, _ = apa_loss(
        log_prob,
        log_prob.detach(),
        advantages,
        torch.ones(1, 2),
        POLICY_LOSSES.make_settings("apa", lam=2.0),
        ref_log_prob=ref,
    )
    # targets: ref + A / 2 = [-1.0, -2.25]; squared errors: [0, 0.0625]
    close(loss, [[0.0, 0.0625]])
    loss.sum().backward()
    close(log_prob.grad, [[0.0, 0.5]])  # 2 (log pi - target)


def test_rebel_loss_regresses_reward_differences_on_log_ratio_differences():
    from rlkit.algos.policy_losses import rebel_loss

    # two pairs, rows interleaved as a shuffled micro-batch would hold them: groups 1, 0, 1, 0
    group_index = torch.tensor([1, 0, 1, 0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    old = torch.zeros(4, 2)
    log_prob = torch.tensor(
        [[0.1, 0.1], [0.3, 9.0], [0.0, 0.0], [-0.1, 0.0]]
    )  # sequence log-ratios 0.2, 0.3 (padding ignored), 0, -0.1
    advantages = (
        torch.tensor([0.5, 0.25, -0.5, -0.25])[:, None] * mask
    )  # reward differences: pair 1 -> 1.0, pair 0 -> 0.5
    loss, _ = rebel_loss(
        log_prob, old, advantages, mask, POLICY_LOSSES.make_settings("rebel", eta=0.5), group_index=group_index
    )
    # pair 1: (0.2 - 0) / 0.5 - 1.0 = -0.6 -> 0.36; pair 0: (0.3 - (-0.1)) / 0.5 - 0.5 = 0.3 -> 0.09
    close(loss[:, 0], [0.36, 0.09, 0.36, 0.09])
    with pytest.raises(ValueError, match="exactly two"):
        rebel_loss(
            log_prob,
            old,
            advantages,
            mask,
            POLICY_LOSSES.make_settings("rebel"),
            group_index=torch.tensor([0, 0, 0, 1]),
        )
