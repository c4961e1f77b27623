"""The algorithm zoo (critic-free estimators, policy losses, reward shaping, presets),
checked against hand-worked values and limiting cases."""

from __future__ import annotations

import math
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from rlkit.algos import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, AdvantageInputs, aggregate_loss
from rlkit.algos.advantages import (
    EPISODE_INPUTS,
    bnpo_advantage,
    bnpo_beta_parameters,
    grpo_advantage,
    nsr_advantage,
    reinforce_pp_advantage,
    reinforce_pp_baseline_advantage,
    remax_advantage,
    rloo_advantage,
    w_reinforce_advantage,
)
from rlkit.algos.masked import group_stats, masked_mean
from rlkit.algos.policy_losses import ce_gppo_loss, gspo_loss, pspo_loss
from rlkit.loops.registry import LOOPS
from rlkit.registry import GROUPS
from rlkit.rewards import REWARDS, build_reward
from rlkit.rewards.shaping import overlong_penalty_reward, overlong_penalty_value
from rlkit.settings import ConfigError, check_settings

F64 = torch.float64
CONF_ALGO = Path(__file__).resolve().parents[1] / "conf" / "algo"


def adv(name: str, **changes):
    """Advantage estimator ``name``'s settings: its defaults (the papers' values) with ``changes``."""
    return ADVANTAGE_ESTIMATORS.make_settings(name, **changes)


def policy_loss(name: str, **changes):
    """Policy loss ``name``'s settings: its defaults (the papers' values) with ``changes``."""
    return POLICY_LOSSES.make_settings(name, **changes)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def make_inputs(scores, lengths, groups, horizon=3, baseline=None, shaping=None) -> AdvantageInputs:
    """Score on each sample's last response token; ``shaping`` (per-token lists) added on
    response tokens; 100 on padding, which every estimator must ignore."""
    mask = torch.zeros(len(scores), horizon, dtype=torch.long)
    rewards = torch.full((len(scores), horizon), 100.0)
    for i, (score, length) in enumerate(zip(scores, lengths)):
        mask[i, :length] = 1
        rewards[i, :length] = 0.0
        if shaping is not None:
            rewards[i, :length] = torch.tensor(shaping[i], dtype=torch.float32)
        rewards[i, length - 1] += score
    base = None if baseline is None else torch.tensor(baseline, dtype=torch.float32)
    return AdvantageInputs(rewards, mask, torch.tensor(groups), baseline_scores=base)


def per_token(values, inputs) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[:, None] * inputs.response_mask


# Six samples in three groups: {1, 0, 2} (k = 3), {3, 5} (k = 2), {7} alone.
SIX = dict(scores=(1.0, 0.0, 2.0, 3.0, 5.0, 7.0), lengths=(3, 1, 2, 3, 1, 2), groups=(0, 0, 0, 1, 1, 2))


# --------------------------------------------------------------------------- registries and defaults


def test_zoo_names_are_registered():
    for name, fn in {
        "rloo": rloo_advantage,
        "reinforce_pp": reinforce_pp_advantage,
        "reinforce_pp_baseline": reinforce_pp_baseline_advantage,
        "remax": remax_advantage,
        "nsr": nsr_advantage,
        "w_reinforce": w_reinforce_advantage,
        "bnpo": bnpo_advantage,
    }.items():
        assert ADVANTAGE_ESTIMATORS.get(name) is fn
    assert POLICY_LOSSES.get("gspo") is gspo_loss
    assert POLICY_LOSSES.get("ce_gppo") is ce_gppo_loss
    assert POLICY_LOSSES.get("pspo") is pspo_loss
    assert REWARDS.get("overlong_penalty") is overlong_penalty_reward


def test_settings_defaults_are_the_papers_values():
    assert adv("reinforce_pp").gamma == 1.0  # REINFORCE++: undiscounted
    assert adv("nsr").correct_threshold == 0.5
    w = adv("w_reinforce")
    assert (w.correct_threshold, w.positive_weight) == (0.5, 0.1)  # W-REINFORCE lambda
    gppo = policy_loss("ce_gppo")
    assert (gppo.beta1, gppo.beta2) == (0.75, 1.0)  # CE-GPPO 7B recipe
    assert policy_loss("pspo").alpha == 0.1
    bnpo = adv("bnpo")
    assert (bnpo.score_min, bnpo.score_max) == (0.0, 1.0)


# --------------------------------------------------------------------------- RLOO


def test_rloo_hand_values_and_group_of_one():
    inputs = make_inputs(**SIX)
    advantages, returns = rloo_advantage(inputs, adv("rloo"))
    # group {1, 0, 2}: 1 - (0+2)/2 = 0;  0 - (1+2)/2 = -1.5;  2 - (1+0)/2 = 1.5
    # group {3, 5}:    3 - 5 = -2;       5 - 3 = 2
    # group {7}:       no other sample -> 0
    close(advantages, per_token([0.0, -1.5, 1.5, -2.0, 2.0, 0.0], inputs))
    assert torch.equal(returns, advantages)
    assert torch.all(advantages[inputs.response_mask == 0] == 0)  # padding junk (100) ignored


def test_rloo_is_grpo_without_std_scaled_by_k_over_k_minus_one():
    inputs = make_inputs(**SIX)
    rloo, _ = rloo_advantage(inputs, adv("rloo"))
    centred, _ = grpo_advantage(inputs, adv("grpo", norm_by_std=False))
    # k = 3 -> x 3/2; k = 2 -> x 2; k = 1 -> both 0
    factor = torch.tensor([1.5, 1.5, 1.5, 2.0, 2.0, 1.0])[:, None]
    close(rloo, centred * factor)


def test_rloo_all_equal_rewards_give_zero():
    inputs = make_inputs(scores=(0.5, 0.5, 0.5), lengths=(1, 2, 3), groups=(4, 4, 4))
    assert torch.equal(rloo_advantage(inputs, adv("rloo"))[0], torch.zeros(3, 3))


# --------------------------------------------------------------------------- REINFORCE++


def test_reinforce_pp_return_to_go_and_global_normalisation_hand_values():
    # sample 0 (3 tokens): per-token -beta*KL = (-0.1, -0.2, -0.3), score 1 on the last token
    #   token rewards (-0.1, -0.2, 0.7) -> returns-to-go (0.4, 0.5, 0.7)
    # sample 1 (1 token): score -0.5 -> return (-0.5)
    inputs = make_inputs(scores=(1.0, -0.5), lengths=(3, 1), groups=(0, 1), shaping=[[-0.1, -0.2, -0.3], [0.0]])
    eps = 1e-6
    advantages, returns = reinforce_pp_advantage(inputs, adv("reinforce_pp", eps=eps))
    close(returns, [[0.4, 0.5, 0.7], [-0.5, 0.0, 0.0]])
    # over the 4 response tokens: mean = (0.4 + 0.5 + 0.7 - 0.5)/4 = 0.275
    # deviations (0.125, 0.225, 0.425, -0.775); squares sum 0.8475; population var 0.211875
    std = math.sqrt(0.8475 / 4)
    close(
        advantages, [[0.125 / (std + eps), 0.225 / (std + eps), 0.425 / (std + eps)], [-0.775 / (std + eps), 0.0, 0.0]]
    )
    # without the std: centred only
    centred, _ = reinforce_pp_advantage(inputs, adv("reinforce_pp", norm_by_std=False))
    close(centred, [[0.125, 0.225, 0.425], [-0.775, 0.0, 0.0]])


def test_reinforce_pp_discounted_returns():
    inputs = make_inputs(scores=(1.0,), lengths=(3,), groups=(0,), horizon=4)
    _, returns = reinforce_pp_advantage(inputs, adv("reinforce_pp", gamma=0.5))
    # r = (0, 0, 1, pad): G_2 = 1, G_1 = 0.5 * 1, G_0 = 0.5^2 * 1
    close(returns, [[0.25, 0.5, 1.0, 0.0]])


def test_reinforce_pp_advantages_have_zero_mean_and_unit_std_over_masked_tokens():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (12,), generator=generator).tolist()
    shaping = [(0.05 * torch.randn(n, generator=generator)).tolist() for n in lengths]
    scores = torch.randint(0, 2, (12,), generator=generator).float().tolist()
    inputs = make_inputs(scores, lengths, list(range(12)), horizon=8, shaping=shaping)
    advantages, _ = reinforce_pp_advantage(inputs, adv("reinforce_pp", eps=1e-8))
    mask = inputs.response_mask
    mean = masked_mean(advantages.double(), mask)
    close(mean, 0.0, atol=1e-6)
    close(masked_mean((advantages.double() - mean) ** 2, mask).sqrt(), 1.0, atol=1e-5)
    assert torch.all(advantages[mask == 0] == 0)


def test_reinforce_pp_baseline_subtracts_group_mean_then_normalises_globally():
    inputs = make_inputs(**SIX)
    eps = 1e-6
    advantages, _ = reinforce_pp_baseline_advantage(inputs, adv("reinforce_pp_baseline", eps=eps))
    # r - group mean: (0, -1, 1 | -1, 1 | 0), on (3, 1, 2 | 3, 1 | 2) tokens = 12 tokens
    # token values: 0,0,0, -1, 1,1, -1,-1,-1, 1, 0,0 -> sum -1, mean -1/12
    # squares sum 7 -> population var 7/12 - (1/12)^2 = 83/144, std sqrt(83)/12 = 0.759203
    mean, std = -1 / 12, math.sqrt(83) / 12
    expected = (per_token([0.0, -1.0, 1.0, -1.0, 1.0, 0.0], inputs) - mean) / (std + eps) * inputs.response_mask
    close(advantages, expected)
    close(advantages[0, 0], (1 / 12) / std)  # a sample at its group's mean still moves: the batch mean is not 0


def test_reinforce_pp_baseline_all_equal_rewards_give_zero_not_nan():
    inputs = make_inputs(scores=(1.0, 1.0, 1.0, 1.0), lengths=(1, 2, 3, 1), groups=(0, 0, 1, 1))
    advantages, _ = reinforce_pp_baseline_advantage(inputs, adv("reinforce_pp_baseline"))
    assert torch.equal(advantages, torch.zeros(4, 3))  # all centred to 0; 0 / (0 + eps) = 0


def _rank_worker(rank: int, world: int, port: int, out_dir: str, parts) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {
            name: ADVANTAGE_ESTIMATORS.get(name)(parts[rank], adv(name))[0]
            for name in ("reinforce_pp", "reinforce_pp_baseline", "bnpo")
        }
        torch.save(results, Path(out_dir) / f"{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_batch_statistics_are_global_over_processes(tmp_path):
    # Two processes, each with its own prompts (as the loop splits them), must produce exactly
    # the advantages one process computes on the whole batch.
    whole = make_inputs(
        scores=(1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0),
        lengths=(1, 3, 2, 2, 3, 1, 1, 2),
        groups=(0, 0, 1, 1, 2, 2, 3, 3),
        shaping=[[0.1] * n for n in (1, 3, 2, 2, 3, 1, 1, 2)],
    )
    halves = [
        AdvantageInputs(whole.token_rewards[rows], whole.response_mask[rows], whole.group_index[rows])
        for rows in (slice(0, 4), slice(4, 8))
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_worker, args=(2, port, str(tmp_path), halves), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for name in ("reinforce_pp", "reinforce_pp_baseline", "bnpo"):
        expected, _ = ADVANTAGE_ESTIMATORS.get(name)(whole, adv(name))
        close(torch.cat([parts[0][name], parts[1][name]]), expected, atol=1e-6)


# --------------------------------------------------------------------------- ReMax


def test_remax_is_reward_minus_greedy_reward_on_every_token():
    inputs = make_inputs(scores=(1.0, 0.0, 0.5), lengths=(3, 1, 2), groups=(0, 1, 2), baseline=(0.5, 0.0, 1.0))
    advantages, returns = remax_advantage(inputs, adv("remax"))
    close(advantages, per_token([0.5, 0.0, -0.5], inputs))
    close(returns, per_token([1.0, 0.0, 0.5], inputs))


def test_remax_with_per_token_shaping_uses_the_return_to_go():
    # token rewards (-0.1, 1.0 - 0.1): returns-to-go (0.8, 0.9); greedy baseline 0.5
    inputs = make_inputs(scores=(1.0,), lengths=(2,), groups=(0,), baseline=(0.5,), shaping=[[-0.1, -0.1]])
    advantages, _ = remax_advantage(inputs, adv("remax"))
    close(advantages, [[0.3, 0.4, 0.0]])


def test_remax_without_baseline_scores_says_what_to_set():
    with pytest.raises(ValueError, match="algo/value_source=greedy"):
        remax_advantage(make_inputs(scores=(1.0,), lengths=(1,), groups=(0,)), adv("remax"))


# --------------------------------------------------------------------------- NSR / W-REINFORCE

# 1.0 right; 0.0 wrong; 1.1 right (answer + format bonus); 0.1 wrong (format only); 0.5 not above 0.5: wrong
BINARY = dict(scores=(1.0, 0.0, 1.1, 0.1, 0.5), lengths=(1, 2, 3, 1, 2), groups=(0, 0, 0, 1, 1))


def test_nsr_trains_only_on_wrong_samples():
    inputs = make_inputs(**BINARY)
    advantages, _ = nsr_advantage(inputs, adv("nsr"))
    close(advantages, per_token([0.0, -1.0, 0.0, -1.0, -1.0], inputs))
    # a lower threshold makes 0.5 right (and 0.1 still wrong)
    close(nsr_advantage(inputs, adv("nsr", correct_threshold=0.3))[0], per_token([0.0, -1.0, 0.0, -1.0, 0.0], inputs))


def test_w_reinforce_weights_right_samples_by_lambda():
    inputs = make_inputs(**BINARY)
    close(w_reinforce_advantage(inputs, adv("w_reinforce"))[0], per_token([0.1, -1.0, 0.1, -1.0, -1.0], inputs))
    # lambda = 1 is plain REINFORCE with rewards in {+1, -1}; lambda = 0 is NSR
    close(
        w_reinforce_advantage(inputs, adv("w_reinforce", positive_weight=1.0))[0],
        per_token([1.0, -1.0, 1.0, -1.0, -1.0], inputs),
    )
    close(
        w_reinforce_advantage(inputs, adv("w_reinforce", positive_weight=0.0))[0], nsr_advantage(inputs, adv("nsr"))[0]
    )


# --------------------------------------------------------------------------- BNPO


def groups_of(rates_and_sizes):
    """Binary scores for groups with the given success counts: [(successes, size), ...]."""
    scores, groups = [], []
    for g, (successes, size) in enumerate(rates_and_sizes):
        scores += [1.0] * successes + [0.0] * (size - successes)
        groups += [g] * size
    return make_inputs(scores, [1] * len(scores), groups, horizon=1)


def test_bnpo_beta_parameters_by_method_of_moments():
    def params(p_values):
        p = torch.tensor(p_values, dtype=F64)
        return bnpo_beta_parameters(p, torch.ones_like(p))  # groups of one sample each: one prompt per entry

    # p = (1/4, 1/2, 3/4): mu 1/2, unbiased var (1/16 + 0 + 1/16)/2 = 1/16
    #   mu(1-mu)/var - 1 = 4 - 1 = 3; a = b = 3/2 -> alpha = beta = 1 + 1/2 = 3/2
    assert params([0.25, 0.5, 0.75]) == pytest.approx((1.5, 1.5))
    # p = (1/4, 1/4, 1/2): mu 1/3; var (1/144 + 1/144 + 4/144)/2 = 1/48; k = (2/9)*48 - 1 = 29/3
    #   a = k/3 = 29/9 -> alpha = 1 + 29/27; b = 2k/3 = 58/9 -> beta = 1 + 58/27
    assert params([0.25, 0.25, 0.5]) == pytest.approx((1 + 29 / 27, 1 + 58 / 27))
    # over-dispersed (var >= mu(1-mu)): a, b <= 0 -> clamped to alpha = beta = 1
    assert params([0.0, 1.0, 0.5]) == pytest.approx((1.0, 1.0))
    # one prompt, or no spread: uniform density
    assert params([0.3]) == (1.0, 1.0)
    assert params([0.4, 0.4]) == (1.0, 1.0)
    # each group counts once, whatever its size: two samples of p = 1/4 are one prompt
    p = torch.tensor([0.25, 0.25, 0.5, 0.75], dtype=F64)
    assert bnpo_beta_parameters(p, torch.tensor([2.0, 2.0, 1.0, 1.0], dtype=F64)) == pytest.approx((1.5, 1.5))


def test_bnpo_with_alpha_beta_three_halves_is_grpo_with_population_std_times_pi_over_8():
    # groups of 4 with success rates 1/4, 1/2, 3/4 -> alpha = beta = 3/2 (previous test)
    # f(p) = sqrt(p(1-p)) / B(3/2, 3/2) with B(3/2, 3/2) = pi/8, so A = (pi/8) (x - p) / sqrt(p(1-p))
    inputs = groups_of([(1, 4), (2, 4), (3, 4)])
    advantages, _ = bnpo_advantage(inputs, adv("bnpo"))
    expected = []
    for successes in (1, 2, 3):
        p = successes / 4
        expected += [
            (math.pi / 8) * (x - p) / math.sqrt(p * (1 - p)) for x in [1.0] * successes + [0.0] * (4 - successes)
        ]
    close(advantages[:, 0], expected)
    # p = 1/2: (pi/8) * 0.5 / 0.5 = pi/8 = 0.392699
    close(advantages[4, 0], math.pi / 8)


def test_bnpo_with_uniform_density_is_reinforce_with_group_baseline():
    # rates 0, 1, 1/2 are over-dispersed -> alpha = beta = 1, f = 1, A = x - p
    inputs = groups_of([(0, 2), (2, 2), (1, 2)])
    advantages, _ = bnpo_advantage(inputs, adv("bnpo"))
    close(advantages[:, 0], [0.0, 0.0, 0.0, 0.0, 0.5, -0.5])


def test_bnpo_all_right_or_all_wrong_groups_give_zero_and_stay_finite():
    # rates (0, 1, 1/2, 1/2, 1/2): mu 1/2, unbiased var (1/4 + 1/4)/4 = 1/8; k = (1/4)/(1/8) - 1 = 1
    #   a = b = 1/2 -> alpha = beta = 1 + 1/6 > 1, so f(0) = f(1) = 0: 1/f is capped at 1e6, and x - p = 0 there
    inputs = groups_of([(0, 4), (4, 4), (2, 4), (2, 4), (2, 4)])
    p, _, size = group_stats(inputs.scores.double(), inputs.group_index)
    assert bnpo_beta_parameters(p, size) == pytest.approx((7 / 6, 7 / 6))
    advantages, _ = bnpo_advantage(inputs, adv("bnpo"))
    assert torch.isfinite(advantages).all()
    assert torch.equal(advantages[:8], torch.zeros(8, 1))
    # p = 1/2: f = (1/4)^(1/6) / B(7/6, 7/6); A = +-0.5 / f
    density = 0.25 ** (1 / 6) / math.exp(2 * math.lgamma(7 / 6) - math.lgamma(7 / 3))
    close(advantages[8:, 0], [0.5 / density, 0.5 / density, -0.5 / density, -0.5 / density] * 3)


def test_bnpo_group_of_one_gets_zero_and_scores_are_mapped_onto_the_unit_interval():
    alone = make_inputs(scores=(1.0,), lengths=(2,), groups=(0,))
    assert torch.equal(bnpo_advantage(alone, adv("bnpo"))[0], torch.zeros(1, 3))
    # scores in {0, 2} with score_max = 2 behave as {0, 1}
    binary = groups_of([(1, 4), (2, 4), (3, 4)])
    doubled = AdvantageInputs(2 * binary.token_rewards, binary.response_mask, binary.group_index)
    close(bnpo_advantage(doubled, adv("bnpo", score_max=2.0))[0], bnpo_advantage(binary, adv("bnpo"))[0])
    # a score above the range is clipped into it: 1.1 counts as 1
    bonus = AdvantageInputs(binary.token_rewards * 1.1, binary.response_mask, binary.group_index)
    close(bnpo_advantage(bonus, adv("bnpo"))[0], bnpo_advantage(binary, adv("bnpo"))[0])
    # an empty range is refused before training, naming the key
    with pytest.raises(ConfigError, match=r"^algo\.advantage\.score_max=1\.0: must be above score_min=1\.0$"):
        check_settings(adv("bnpo", score_min=1.0, score_max=1.0), "algo.advantage")


# --------------------------------------------------------------------------- GSPO


def test_gspo_at_ratio_one_has_the_gradient_of_the_clipped_loss_with_seq_mean_token_mean():
    generator = torch.Generator().manual_seed(1)
    log_prob = torch.randn(4, 5, generator=generator, dtype=F64).clamp(max=-0.1)
    advantages = torch.randn(4, 1, generator=generator, dtype=F64).expand(4, 5).contiguous()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    grads = []
    for name in ("gspo", "clipped"):
        lp = log_prob.clone().requires_grad_(True)
        settings = policy_loss(name, clip_low=3e-4, clip_high=4e-4)
        loss, _ = POLICY_LOSSES.get(name)(lp, log_prob.clone(), advantages, mask, settings)
        close(loss.detach() * mask, -advantages * mask)  # value -A on every token
        aggregate_loss(loss, mask, "seq-mean-token-mean").backward()
        grads.append(lp.grad)
    close(grads[0], grads[1], atol=1e-12)
    # d/d log pi_t of 1/4 sum_i 1/|y_i| sum_t (-A_i) pi_t/sg(pi_t) = -A_i / (4 |y_i|)
    close(grads[0][1, :2], (-advantages[1, 0] / 8).repeat(2), atol=1e-12)


def test_gspo_token_form_equals_the_sequence_objective_off_policy():
    # sequence-level GSPO: -1/G sum_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log r_i,t), by autograd
    generator = torch.Generator().manual_seed(2)
    old = -torch.rand(5, 6, generator=generator, dtype=F64) - 0.1
    new = old + 0.02 * torch.randn(5, 6, generator=generator, dtype=F64)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0], [1] + [0] * 5])
    adv_seq = torch.tensor([1.0, -1.0, 0.5, -2.0, 1.5], dtype=F64)
    c = policy_loss("gspo", clip_low=3e-3, clip_high=4e-3)

    lp = new.clone().requires_grad_(True)
    loss, metrics = gspo_loss(lp, old, adv_seq[:, None].expand(5, 6), mask, c)
    aggregate_loss(loss, mask, "seq-mean-token-mean").backward()

    lp2 = new.clone().requires_grad_(True)
    m = mask.to(F64)
    s = torch.exp(((lp2 - old) * m).sum(-1) / m.sum(-1))
    seq_loss = -torch.minimum(s * adv_seq, s.clamp(1 - 3e-3, 1 + 4e-3) * adv_seq).mean()
    seq_loss.backward()
    close(aggregate_loss(loss.detach(), mask, "seq-mean-token-mean"), seq_loss.detach(), atol=1e-12)
    close(lp.grad * m, lp2.grad * m, atol=1e-12)
    close(metrics["seq_ratio_mean"], s.detach().mean(), atol=1e-12)


def test_gspo_clips_whole_sequences_and_ignores_padding():
    # one sequence of 2 tokens, log ratios (ln 2, 0): s = exp(ln2 / 2) = sqrt 2, far above 1 + 4e-4;
    # the padding position holds a wild log-prob that must not enter s
    old = torch.tensor([[-1.0, -1.0, -1.0]], dtype=F64)
    new = torch.tensor([[-1.0 + math.log(2), -1.0, 5.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    for a, expected_loss, expected_grad in (
        (1.0, -(1 + 4e-4), 0.0),  # A > 0, s above the range: clipped, no gradient
        (-1.0, math.sqrt(2), math.sqrt(2)),  # A < 0: min picks s A (pessimistic), loss -s A, d/d log pi_t = -A s
    ):
        lp = new.clone().requires_grad_(True)
        loss, metrics = gspo_loss(
            lp, old, torch.full((1, 3), a, dtype=F64), mask, policy_loss("gspo", clip_low=3e-4, clip_high=4e-4)
        )
        loss[0, :2].sum().backward()
        close(loss.detach()[0, :2], [expected_loss] * 2, atol=1e-12)
        close(lp.grad[0, :2], [expected_grad] * 2, atol=1e-12)
        close(metrics["clip_frac"], 1.0 if a > 0 else 0.0)
        close(metrics["seq_ratio_mean"], math.sqrt(2), atol=1e-12)


# --------------------------------------------------------------------------- CE-GPPO


def loss_case(name, ratios, advantages, **settings):
    """Per-token loss, metrics and d loss / d log_prob of policy loss ``name`` (with ``settings``)
    for the given ratios (old_log_prob = 0)."""
    log_prob = torch.tensor([ratios], dtype=F64).log().requires_grad_(True)
    loss, metrics = POLICY_LOSSES.get(name)(
        log_prob,
        torch.zeros_like(log_prob),
        torch.tensor([advantages], dtype=F64),
        torch.ones(1, len(ratios)),
        policy_loss(name, **settings),
    )
    loss.sum().backward()
    return loss.detach()[0], metrics, log_prob.grad[0]


def test_ce_gppo_equals_clipped_when_nothing_is_clipped():
    ratios, advs = (
        [1.1, 0.9, 0.7, 1.3, 1.0],
        [1.0, -1.0, 1.0, -1.0, 0.5],
    )  # outside the bounds only on the pessimistic side
    c = dict(clip_low=0.2, clip_high=0.2)
    for got, want in zip(loss_case("ce_gppo", ratios, advs, **c)[::2], loss_case("clipped", ratios, advs, **c)[::2]):
        close(got, want, atol=1e-12)


def test_ce_gppo_keeps_a_bounded_gradient_on_clipped_tokens_hand_values():
    clip = dict(clip_low=0.2, clip_high=0.28)
    ratios = [1.25, 1.30, 0.70, 0.70, 1.30, 0.85]
    advs = [1.0, 1.0, -1.0, 1.0, -1.0, -2.0]
    loss, metrics, grad = loss_case("ce_gppo", ratios, advs, **clip, beta1=0.75, beta2=1.0)
    #   r=1.25, A=+1 inside:             -r A = -1.25;                      grad -r A = -1.25
    #   r=1.30, A=+1 above 1.28:         -beta2 (1.28) A = -1.28;            grad -beta2 (1.28) A = -1.28 (clipped: 0)
    #   r=0.70, A=-1 below 0.8:          -beta1 (0.8) A = 0.75 * 0.8 = 0.6;  grad 0.6                    (clipped: 0)
    #   r=0.70, A=+1 pessimistic side:   -0.70;                              grad -0.70
    #   r=1.30, A=-1 pessimistic side:   +1.30;                              grad +1.30
    #   r=0.85, A=-2 inside:             +1.70;                              grad +1.70
    close(loss, [-1.25, -1.28, 0.6, -0.70, 1.30, 1.70], atol=1e-12)
    close(grad, [-1.25, -1.28, 0.6, -0.70, 1.30, 1.70], atol=1e-12)
    close(metrics["clip_frac"], 2 / 6, atol=1e-12)
    close(metrics["clip_frac_low"], 1 / 6, atol=1e-12)
    close(metrics["clip_frac_high"], 1 / 6, atol=1e-12)
    # beta = 0 recovers PPO's zero gradient on clipped tokens
    _, _, grad0 = loss_case("ce_gppo", ratios, advs, **clip, beta1=0.0, beta2=0.0)
    _, _, grad_clipped = loss_case("clipped", ratios, advs, **clip)
    close(grad0, grad_clipped, atol=1e-12)
    # beta = 1: the forward value is exactly PPO's clipped value
    loss1, _, _ = loss_case("ce_gppo", ratios, advs, **clip, beta1=1.0, beta2=1.0)
    close(loss1, loss_case("clipped", ratios, advs, **clip)[0], atol=1e-12)


# --------------------------------------------------------------------------- PSPO


def test_pspo_with_alpha_zero_is_the_unclipped_ratio_objective():
    ratios, advs = [1.3, 0.7, 1.0, 2.0], [1.0, -1.0, 0.5, -0.5]
    loss, metrics, grad = loss_case("pspo", ratios, advs, alpha=0.0)
    # -r A, and its gradient -r A (d r / d log pi = r), never zeroed; PPO's clip at 0.2 zeroes the
    # first two (r = 1.3 with A > 0, r = 0.7 with A < 0)
    close(loss, [-1.3, 0.7, -0.5, 1.0], atol=1e-12)
    close(grad, [-1.3, 0.7, -0.5, 1.0], atol=1e-12)
    close(loss_case("clipped", ratios, advs)[2], [0.0, 0.0, -0.5, 1.0], atol=1e-12)
    close(metrics["smoothed_ratio_mean"], metrics["ratio_mean"], atol=1e-12)


def test_pspo_smooths_the_ratio_toward_one_hand_values():
    loss, metrics, grad = loss_case("pspo", [1.3, 0.7, 1.0], [1.0, -1.0, 2.0], alpha=0.1)
    # r_s = 0.9 r + 0.1: 1.27, 0.73, 1.0; loss -r_s A; gradient -0.9 r A
    close(loss, [-1.27, 0.73, -2.0], atol=1e-12)
    close(grad, [-1.17, 0.63, -1.8], atol=1e-12)
    close(metrics["smoothed_ratio_mean"], (1.27 + 0.73 + 1.0) / 3, atol=1e-12)


# --------------------------------------------------------------------------- DAPO overlong penalty


def test_overlong_penalty_hand_values():
    # L_max = 10, L_cache = 4: free up to 6, then (6 - |y|)/4, -1 beyond 10
    values = [overlong_penalty_value(n, 10, 4) for n in (0, 5, 6, 7, 8, 9, 10, 11, 50)]
    assert values == pytest.approx([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    # no cache window: a step at L_max
    assert [overlong_penalty_value(n, 10, 0) for n in (10, 11)] == [0.0, -1.0]
    for bad in ((0, 0), (10, 11), (10, -1)):
        with pytest.raises(ValueError, match="overlong_penalty"):
            overlong_penalty_value(5, *bad)


def test_overlong_penalty_counts_token_ids_else_whitespace_words():
    completions = ["one two three", "a b c d e f g h"]
    # token ids win over the text: 7 and 9 tokens
    assert overlong_penalty_reward(
        [""] * 2, completions, completion_ids=[[1] * 7, [2] * 9], max_length=10, cache_length=4
    ) == pytest.approx([-0.25, -0.75])
    # without ids: 3 and 8 words
    assert overlong_penalty_reward([""] * 2, completions, max_length=10, cache_length=4) == pytest.approx([0.0, -0.5])


def test_overlong_penalty_as_a_reward_term_ignores_row_fields():
    term = {"fn": "overlong_penalty", "weight": 1.0, "args": {"max_length": 10, "cache_length": 4}}
    reward = build_reward(SimpleNamespace(fn=None, terms={"overlong": term}))
    totals, per_term = reward(["p", "p"], ["x", "y"], answer=["1", "2"], completion_ids=[[0] * 8, [0] * 2])
    assert totals == pytest.approx([-0.5, 0.0])
    assert per_term["overlong"] == pytest.approx([-0.5, 0.0])


# --------------------------------------------------------------------------- presets

PRESETS = sorted(p.stem for p in CONF_ALGO.glob("*.yaml"))


def test_every_zoo_algorithm_has_a_preset():
    assert {
        "dr_grpo",
        "dapo",
        "rloo",
        "reinforce_pp",
        "reinforce_pp_baseline",
        "remax",
        "gspo",
        "nsr",
        "w_reinforce",
        "bnpo",
        "ce_gppo",
        "pspo",
    } <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_into_the_schema_and_validates(compose_config, name):
    from rlkit.validate import validate

    c = compose_config(f"algo={name}")
    if c.algo.loop in ("preference", "reward_model"):  # offline preference presets need a task with pairs
        c = compose_config(f"algo={name}", "task=hh")
    elif "advantage" in c.algo and set(EPISODE_INPUTS) & set(
        getattr(ADVANTAGE_ESTIMATORS.get(c.algo.advantage.name), "inputs", ())
    ):
        c = compose_config(f"algo={name}", "task=maze")  # estimators of turns (gigpo, turn_gae) need episodes
    validate(c)
    assert c.algo.name == name
    assert c.algo.loop in LOOPS
    for registry in GROUPS.values():  # every component the preset chooses is registered
        node = OmegaConf.select(c, registry.key, default=None)
        assert node is None or node[registry.name_field] in registry, registry.key
    text = (CONF_ALGO / f"{name}.yaml").read_text()
    assert text.startswith("#")  # each preset opens with the paper it follows


def test_preset_key_values(compose_config):
    assert compose_config("algo=grpo").algo.value_source.name == "none"  # no extra rollouts unless a preset asks
    dr = compose_config("algo=dr_grpo").algo
    assert (dr.advantage.norm_by_std, dr.loss_agg, dr.kl.coef) == (False, "seq-mean-token-sum-norm", 0.0)
    dapo = compose_config("algo=dapo").algo
    assert (dapo.policy_loss.clip_low, dapo.policy_loss.clip_high, dapo.loss_agg) == (0.2, 0.28, "token-mean")
    assert (dapo.group_filter.name, dapo.kl.coef) == ("dynamic", 0.0)
    gspo = compose_config("algo=gspo").algo
    assert (gspo.policy_loss.name, gspo.policy_loss.clip_low, gspo.policy_loss.clip_high, gspo.loss_agg) == (
        "gspo",
        3e-4,
        4e-4,
        "seq-mean-token-mean",
    )
    remax = compose_config("algo=remax").algo
    assert (remax.advantage.name, remax.value_source.name) == ("remax", "greedy")
    rpp = compose_config("algo=reinforce_pp").algo
    assert (rpp.kl.placement, rpp.kl.estimator, rpp.advantage.name, rpp.advantage.gamma) == (
        "reward",
        "k1",
        "reinforce_pp",
        1.0,
    )
    w = compose_config("algo=w_reinforce").algo.advantage
    assert (w.name, w.positive_weight) == ("w_reinforce", 0.1)


def test_dapo_overlong_override_from_the_preset_comment_works(compose_config):
    from rlkit.validate import validate

    c = compose_config(
        "algo=dapo",
        "+reward.terms.overlong={fn: overlong_penalty, weight: 1.0, args: {max_length: 10, cache_length: 4}}",
    )
    validate(c)
    assert set(c.reward.terms) == {"answer", "format", "overlong"}
    totals, per_term = build_reward(c.reward)(["q"], ["#### 3"], answer=["3"], completion_ids=[[0] * 8])
    assert per_term["overlong"] == pytest.approx([-0.5])
    assert totals == pytest.approx([1.0 + 0.1 - 0.5])  # answer 1 + format 0.1 + overlong -0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ("algo=remax", "algo/value_source=none"),
            "algo.value_source=none: advantage 'remax' reads ['baseline_scores'], and this value source provides none",
        ),
        (("algo/value_source=beam",), "algo/value_source=beam: unknown option of group algo/value_source; valid: "),
        (("algo=pspo", "algo.policy_loss.alpha=1.0"), "algo.policy_loss.alpha=1.0: must be in [0, 1)"),
        (("algo=reinforce_pp", "algo.advantage.gamma=1.5"), "algo.advantage.gamma=1.5: must be in [0, 1]"),
        (
            ("algo=grpo", "algo.advantage.eps=0"),
            "algo.advantage.eps=0.0: must be positive when norm_by_std is true",
        ),
        (("algo=bnpo", "algo.advantage.score_max=0.0"), "algo.advantage.score_max=0.0: must be above score_min=0.0"),
        (("algo=ce_gppo", "algo.policy_loss.beta1=-0.5"), "algo.policy_loss.beta1=-0.5: must not be negative"),
        (("algo=w_reinforce", "algo.advantage.positive_weight=-1"), "algo.advantage.positive_weight=-1.0: must not"),
        (
            ("algo=p3o", "algo.policy_loss.clipping=both"),
            "algo.policy_loss.clipping='both': must be one of: joint, separate",
        ),
        (("algo=p3o", "algo.policy_loss.weight_cap=0.5"), "algo.policy_loss.weight_cap=0.5: must be at least 1"),
        (("algo=p3o", "algo.group_size=4"), "algo.group_size=4: policy loss 'p3o' compares the two responses"),
        (
            ("algo=copg", "algo.group_size=4"),
            "algo.group_size=4: policy loss 'copg' compares the two responses of a prompt: set algo.group_size=2",
        ),
        (("algo=copg", "algo.policy_loss.beta=0"), "algo.policy_loss.beta=0.0: must be positive"),
        (("algo=rloo", "algo.group_size=1"), "algo.group_size=1: advantage 'rloo' compares the samples of a prompt"),
        (("algo=vineppo", "algo.value_source.k=0"), "algo.value_source.k=0: must be at least 1"),
        (
            ("algo=grpo", "algo/value_source=monte_carlo"),
            "algo.value_source=monte_carlo: advantage 'grpo' reads no values, and this value source provides",
        ),
        (("algo=vineppo", "algo.value_source.max_states=0"), "algo.value_source.max_states=0: must be at least 1"),
        (("algo=vineppo", "algo.value_source.step_tokens=-1"), "algo.value_source.step_tokens=-1: must not be"),
        (("algo=vineppo", "algo.reward_norm=running"), "algo.reward_norm='running': Monte-Carlo values are in raw"),
        (
            ("algo=ppo", "algo/advantage=vine"),
            "algo.value_source=critic: advantage 'vine' reads ['step_ids', 'values'], and this value source provides",
        ),
    ],
)
def test_validation_rejects_bad_zoo_knobs(compose_config, overrides, message):
    """What `rlkit train` reports: the overrides composed (check_overrides), then the composed config checked."""
    from rlkit.overrides import check_overrides
    from rlkit.validate import validate

    with pytest.raises(ConfigError) as error:
        check_overrides(list(overrides))
        validate(compose_config(*overrides))
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- dual-clip PPO


def dual_clip_case(ratios, advantages, clip_ratio_c):
    log_prob = torch.tensor([ratios], dtype=F64).log().requires_grad_()
    settings = POLICY_LOSSES.make_settings("clipped", clip_ratio_c=clip_ratio_c)
    loss, metrics = POLICY_LOSSES.get("clipped")(
        log_prob,
        torch.zeros_like(log_prob),
        torch.tensor([advantages], dtype=F64),
        torch.ones(1, len(ratios)),
        settings,
    )
    loss.sum().backward()
    return loss.detach()[0], metrics, log_prob.grad[0]


def test_dual_clip_caps_the_loss_of_negative_advantages_at_c_times_minus_a():
    # eps 0.2, c = 3. r = 2.5, A = -1: PPO's loss max(2.5, 1.2) = 2.5, below the cap 3;
    # r = 5, A = -1: PPO's 5 is capped at 3, with zero gradient; r = 0.5, A = -1: 0.8 (clipped at 0.8);
    # r = 5, A = +1: positive advantages are never dual-clipped, -min(5, 1.2) = -1.2.
    loss, metrics, grad = dual_clip_case([2.5, 5.0, 0.5, 5.0], [-1.0, -1.0, -1.0, 1.0], 3.0)
    close(loss, [2.5, 3.0, 0.8, -1.2])
    close(grad, [2.5, 0.0, 0.0, 0.0])  # d(-r A)/d log pi = -A r = 2.5 where unclipped; 0 where a clip binds
    assert float(metrics["clip_frac_dual"]) == pytest.approx(1 / 4)


def test_dual_clip_is_off_by_default_and_leaves_ppo_unchanged():
    assert POLICY_LOSSES.make_settings("clipped").clip_ratio_c is None
    off, metrics, grad_off = dual_clip_case([2.5, 5.0, 0.5, 5.0], [-1.0, -1.0, -1.0, 1.0], None)
    close(off, [2.5, 5.0, 0.8, -1.2])
    close(grad_off, [2.5, 5.0, 0.0, 0.0])
    assert float(metrics["clip_frac_dual"]) == 0.0


def test_dual_clip_preset_and_its_check(compose_config, config_error):
    assert compose_config("algo=dual_clip_ppo").algo.policy_loss.clip_ratio_c == 3.0
    assert config_error("algo=dual_clip_ppo", "task=arith") is None
    assert config_error("algo=ppo", "algo.policy_loss.clip_ratio_c=1.0") == (
        "algo.policy_loss.clip_ratio_c=1.0: must be above 1 (or null: off)"
    )


# --------------------------------------------------------------------------- SPO


def test_spo_hand_values_and_gradient():
    # eps = 0.2; loss = -(r A - |A| (r - 1)^2 / 0.4), d loss / d log pi = -(A - |A| (r - 1) / 0.2) r
    log_prob = torch.tensor([[0.5, 1.0, 1.3, 1.3]], dtype=F64).log().requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, 1.0, -2.0]], dtype=F64)
    loss, metrics = POLICY_LOSSES.get("spo")(
        log_prob, torch.zeros_like(log_prob), advantages, torch.ones(1, 4), policy_loss("spo")
    )
    loss.sum().backward()
    # 0.5 - 0.25/0.4 = -0.125; -1; 1.3 - 0.09/0.4 = 1.075; -2.6 - 0.18/0.4 = -3.05 (negated)
    close(loss.detach(), [[0.125, 1.0, -1.075, 3.05]])
    # -(1 + 2.5) 0.5 = -1.75; -(-1) 1 = 1; -(1 - 1.5) 1.3 = 0.65 (past 1 + eps: pushed back); -(-2 - 3) 1.3 = 6.5
    close(log_prob.grad, [[-1.75, 1.0, 0.65, 6.5]])
    assert float(metrics["outside_trust_region_frac"]) == pytest.approx(3 / 4)


def test_spo_objective_peaks_at_the_trust_region_edge():
    ratios = torch.linspace(0.5, 1.5, 1001, dtype=F64)
    for sign in (1.0, -1.0):
        loss, _ = POLICY_LOSSES.get("spo")(
            ratios.log()[None],
            torch.zeros(1, 1001, dtype=F64),
            torch.full((1, 1001), 2.0 * sign, dtype=F64),
            torch.ones(1, 1001),
            policy_loss("spo", epsilon=0.1),
        )
        assert float(ratios[loss.argmin()]) == pytest.approx(
            1.0 + 0.1 * sign
        )  # the minimum of the loss: r = 1 + sign(A) eps


def test_spo_vanishes_at_zero_advantage_and_its_preset(compose_config, config_error):
    assert POLICY_LOSSES.get("spo").vanishes_at_zero_advantage
    algo = compose_config("algo=spo").algo
    assert (algo.policy_loss.name, algo.policy_loss.epsilon, algo.advantage.name) == ("spo", 0.2, "grpo")
    assert config_error("algo=spo", "algo.policy_loss.epsilon=0") == "algo.policy_loss.epsilon=0.0: must be positive"
