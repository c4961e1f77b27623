"""Turn-level credit assignment (rlkit/algos/multi_turn.py) against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from rlkit.algos.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs
from rlkit.algos.multi_turn import (
    discounted_returns,
    gigpo_advantages,
    turn_gae,
    turn_returns_to_tokens,
    turn_rewards_to_tokens,
    turn_value_positions,
    turn_values_to_tokens,
)

# Two episodes as token layouts: prompt (turn 0 observation), reply, observation, reply, ...
#            p  p  r  r  o  o  r  r  r  o  r  | padding
TURNS = [[0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 0], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]]
LOSS = [[0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0], [0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0]]


def layout() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(TURNS), torch.tensor(LOSS)


def test_discounted_returns_discount_turns():
    assert discounted_returns([0.0, 0.0, 1.0], 0.5) == [0.25, 0.5, 1.0]
    assert discounted_returns([1.0, -1.0, 2.0], 1.0) == [2.0, 1.0, 2.0]
    assert discounted_returns([], 0.9) == []


def test_turn_values_land_on_reply_tokens_of_their_turn():
    turn_index, loss = layout()
    tokens = turn_values_to_tokens([[1.0, 2.0, 3.0], [5.0, 7.0]], turn_index, loss)
    assert tokens.tolist() == [
        [0, 0, 1, 1, 0, 0, 2, 2, 2, 0, 3, 0],
        [0, 0, 5, 0, 7, 7, 0, 0, 0, 0, 0, 0],
    ]


def test_turn_rewards_sit_on_the_last_reply_token_of_each_turn():
    turn_index, loss = layout()
    tokens = turn_rewards_to_tokens([[0.5, 0.0, 1.0], [0.25, 2.0]], turn_index, loss)
    assert tokens.tolist() == [
        [0, 0, 0, 0.5, 0, 0, 0, 0, 0, 0, 1.0, 0],
        [0, 0, 0.25, 0, 0, 2.0, 0, 0, 0, 0, 0, 0],
    ]


def test_turn_returns_on_tokens_use_the_turn_discount():
    turn_index, loss = layout()
    tokens = turn_returns_to_tokens([[0.0, 0.0, 1.0], [0.0, 1.0]], 0.5, turn_index, loss)
    assert tokens[0].tolist() == [0, 0, 0.25, 0.25, 0, 0, 0.5, 0.5, 0.5, 0, 1.0, 0]
    assert tokens[1].tolist() == [0, 0, 0.5, 0, 1.0, 1.0, 0, 0, 0, 0, 0, 0]


def test_turn_gae_matches_hand_computed_values():
    """gamma = 0.5, lam = 0.5, V = (0.2, 0.4, 0.6), r = (0, 0, 1), episode ended (V(s_3) = 0):
    deltas 0 + .5*.4 - .2 = 0, 0 + .5*.6 - .4 = -.1, 1 + 0 - .6 = .4;
    A_2 = .4, A_1 = -.1 + .25*.4 = 0, A_0 = 0 + .25*0 = 0."""
    advantages, returns = turn_gae([0.0, 0.0, 1.0], [0.2, 0.4, 0.6], gamma=0.5, lam=0.5)
    assert advantages == pytest.approx([0.0, 0.0, 0.4])
    assert returns == pytest.approx([0.2, 0.4, 1.0])
    # cut off by a limit: the critic's value of the next state bootstraps the last turn
    cut, _ = turn_gae([0.0], [0.5], gamma=0.5, lam=1.0, bootstrap=0.8)
    assert cut == pytest.approx([0.5 * 0.8 - 0.5])
    # lam = 1, V = 0: the discounted return
    assert turn_gae([0.0, 0.0, 1.0], [0.0] * 3, gamma=0.5, lam=1.0)[0] == pytest.approx([0.25, 0.5, 1.0])
    with pytest.raises(ValueError, match="2 rewards but 1 values"):
        turn_gae([0.0, 1.0], [0.0], 1.0, 1.0)


def test_turn_value_positions_are_the_tokens_before_each_reply():
    turn_index, loss = layout()
    assert turn_value_positions(turn_index, loss) == [[1, 5, 9], [1, 3]]


def test_existing_estimators_score_episodes_by_their_total_reward():
    """GRPO on episode tensors: each reply token of an episode gets its group-normalised total."""
    turn_index, loss = layout()
    rewards = [[0.0, 0.0, 1.0], [0.0, 0.0]]
    inputs = AdvantageInputs(turn_rewards_to_tokens(rewards, turn_index, loss), loss, torch.tensor([0, 0]))
    settings = ADVANTAGE_ESTIMATORS.make_settings("grpo", norm_by_std=False)
    advantages, _ = ADVANTAGE_ESTIMATORS.get("grpo")(inputs, settings)
    assert advantages[0][loss[0].bool()].tolist() == [0.5] * 6
    assert advantages[1][loss[1].bool()].tolist() == [-0.5] * 3
    assert advantages[~loss.bool()].abs().sum() == 0


# Group "A" (three episodes of one instance) and group "B" (two of another), with
# repeated states: s0 starts every episode; s1 is reached by all of A's episodes.
REWARDS = [[0, 0, 1], [0, 0], [0, 0, 0, 1], [1], [0, 0]]
STATES = [["s0", "s1", "s2"], ["s0", "s1"], ["s0", "s3", "s1", "s2"], ["s0"], ["s0", "s1"]]
GROUPS = ["A", "A", "A", "B", "B"]


def test_gigpo_without_std_matches_hand_computed_values():
    """gamma = 0.5, omega = 1, F_norm = 1.

    Episode level: A totals (1, 0, 1), mean 2/3; B totals (1, 0), mean 1/2.
    Discounted returns: (.25, .5, 1), (0, 0), (.125, .25, .5, 1), (1), (0, 0).
    Anchor groups: A/s0 = {.25, 0, .125} (mean .125), A/s1 = {.5, 0, .5} (mean 1/3),
    A/s2 = {1, 1}, A/s3 = {.25} alone, B/s0 = {1, 0} (mean .5; not A's s0), B/s1 alone.
    """
    result = gigpo_advantages(REWARDS, STATES, GROUPS, gamma=0.5, omega=1.0, norm_by_std=False)
    assert result.episode == pytest.approx([1 / 3, -2 / 3, 1 / 3, 0.5, -0.5])
    expected_step = [[0.125, 1 / 6, 0.0], [-0.125, -1 / 3], [0.0, 0.0, 1 / 6, 0.0], [0.5], [-0.5, 0.0]]
    for got, want in zip(result.step, expected_step):
        assert got == pytest.approx(want)
    expected = [[11 / 24, 0.5, 1 / 3], [-19 / 24, -1.0], [1 / 3, 1 / 3, 0.5, 1 / 3], [1.0], [-1.0, -0.5]]
    for got, want in zip(result.combined, expected):
        assert got == pytest.approx(want)
    assert result.anchor_group_sizes == [[3, 3, 2], [3, 3], [3, 1, 3, 2], [2], [2, 1]]


def test_gigpo_with_std_and_omega_matches_hand_computed_values():
    """Unbiased std: A totals (1, 0, 1) have std sqrt(1/3); A/s0 returns std 1/8;
    A/s1 std sqrt(1/12); B's pairs std sqrt(1/2). omega = 0.5 halves the step term."""
    result = gigpo_advantages(REWARDS, STATES, GROUPS, gamma=0.5, omega=0.5, norm_by_std=True, eps=0.0)
    root3, root2 = 3**0.5, 2**0.5
    assert result.episode == pytest.approx([1 / root3, -2 / root3, 1 / root3, 1 / root2, -1 / root2])
    expected_step = [
        [1.0, 1 / root3, 0.0],
        [-1.0, -2 / root3],
        [0.0, 0.0, 1 / root3, 0.0],
        [1 / root2],
        [-1 / root2, 0.0],
    ]
    for got, want in zip(result.step, expected_step):
        assert got == pytest.approx(want)
    assert result.combined[1] == pytest.approx([-2 / root3 - 0.5, -2 / root3 - 1 / root3])
    assert result.combined[3] == pytest.approx([1 / root2 + 0.5 / root2])


def test_gigpo_with_no_repeated_state_is_the_episode_advantage():
    result = gigpo_advantages([[0, 1], [0, 0]], [["a", "b"], ["c", "d"]], [0, 0], gamma=1.0, norm_by_std=False)
    assert result.step == [[0.0, 0.0], [0.0, 0.0]]
    assert result.combined == [[0.5, 0.5], [-0.5, -0.5]]


def test_gigpo_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="state keys"):
        gigpo_advantages([[0, 1]], [["a"]], [0])
    with pytest.raises(ValueError, match="one entry per episode"):
        gigpo_advantages([[0]], [["a"]], [0, 1])


# --------------------------------------------------------------------------- registered estimators on token layouts


def episode_layout(turns_per_episode: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Episodes as response tokens: each turn a reply of two tokens then one observation token."""
    width = 3 * max(turns_per_episode)
    turn_rows, loss_rows = [], []
    for turns in turns_per_episode:
        turn_rows.append([k for k in range(turns) for _ in range(3)] + [0] * (width - 3 * turns))
        loss_rows.append([1, 1, 0] * turns + [0] * (width - 3 * turns))
    return torch.tensor(turn_rows), torch.tensor(loss_rows)


def test_the_gigpo_estimator_gives_each_reply_token_its_turns_advantage():
    """The registered estimator on the token layout of the five episodes above: the turn rewards
    are read back from the token rewards, and every token of turn k carries A^E + omega A^S."""
    turn_index, loss = episode_layout([len(r) for r in REWARDS])
    token_rewards = turn_rewards_to_tokens(REWARDS, turn_index, loss)
    inputs = AdvantageInputs(
        token_rewards, loss, torch.tensor([0, 0, 0, 1, 1]), turn_index=turn_index, state_keys=STATES
    )
    settings = ADVANTAGE_ESTIMATORS.make_settings("gigpo", gamma=0.5, omega=1.0, norm_by_std=False)
    advantages, returns = ADVANTAGE_ESTIMATORS.get("gigpo")(inputs, settings)
    expected = [[11 / 24, 0.5, 1 / 3], [-19 / 24, -1.0], [1 / 3, 1 / 3, 0.5, 1 / 3], [1.0], [-1.0, -0.5]]
    torch.testing.assert_close(advantages, turn_values_to_tokens(expected, turn_index, loss))
    assert advantages[~loss.bool()].abs().sum() == 0 and torch.equal(advantages, returns)


def test_the_gigpo_estimator_refuses_single_responses():
    inputs = AdvantageInputs(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="needs episodes"):
        ADVANTAGE_ESTIMATORS.get("gigpo")(inputs, ADVANTAGE_ESTIMATORS.make_settings("gigpo"))


def test_turn_gae_estimator_reads_the_value_at_each_replys_first_token():
    """The layout of ``layout()``. Episode 0: r = (0, 0, 1), V(s_k) = (.2, .4, .6) at its replies'
    first tokens (2, 6, 10): A = (0, 0, .4), R = (.2, .4, 1) (test_turn_gae_matches_hand_computed_values).
    Episode 1: r = (0, 1), V = (.5, 0) at tokens 2 and 4: deltas -.5 and 1, A = (-.5 + .25, 1) = (-.25, 1),
    R = (.25, 1). Values elsewhere (9) are never read."""
    turn_index, loss = layout()
    token_rewards = turn_rewards_to_tokens([[0.0, 0.0, 1.0], [0.0, 1.0]], turn_index, loss)
    values = torch.full(loss.shape, 9.0)
    values[0, [2, 6, 10]] = torch.tensor([0.2, 0.4, 0.6])
    values[1, [2, 4]] = torch.tensor([0.5, 0.0])
    inputs = AdvantageInputs(token_rewards, loss, torch.tensor([0, 1]), values=values, turn_index=turn_index)
    settings = ADVANTAGE_ESTIMATORS.make_settings("turn_gae", gamma=0.5, lam=0.5, norm_by_std=False)
    advantages, returns = ADVANTAGE_ESTIMATORS.get("turn_gae")(inputs, settings)
    want_a = turn_values_to_tokens([[0.0, 0.0, 0.4], [-0.25, 1.0]], turn_index, loss)
    want_r = turn_values_to_tokens([[0.2, 0.4, 1.0], [0.25, 1.0]], turn_index, loss)
    torch.testing.assert_close(advantages, want_a)
    torch.testing.assert_close(returns, want_r)


def test_token_level_returns_skip_the_observations_between_replies():
    """GAE and discounted returns over a mask with gaps equal those over the same tokens packed
    together: an observation is not a time step. A prefix mask is unchanged by the packing."""
    from rlkit.algos.advantages import _returns_to_go
    from rlkit.algos.gae import generalized_advantages

    turn_index, loss = layout()
    torch.manual_seed(0)
    rewards, values = torch.rand(loss.shape), torch.rand(loss.shape)
    advantages, returns = generalized_advantages(rewards, values, loss, gamma=0.9, lam=0.8)
    discounted = _returns_to_go(rewards, loss, 0.9)
    for row in range(len(loss)):
        keep = loss[row].bool()
        packed = torch.zeros(1, int(keep.sum()))
        want_a, want_r = generalized_advantages(
            rewards[row, keep][None], values[row, keep][None], torch.ones_like(packed), gamma=0.9, lam=0.8
        )
        assert advantages[row, keep].tolist() == pytest.approx(want_a[0].tolist())
        assert returns[row, keep].tolist() == pytest.approx(want_r[0].tolist())
        want_g = _returns_to_go(rewards[row, keep][None], torch.ones_like(packed), 0.9)
        assert discounted[row, keep].tolist() == pytest.approx(want_g[0].tolist())
        assert advantages[row, ~keep].abs().sum() == 0 and discounted[row, ~keep].abs().sum() == 0
    prefix = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    a, r = generalized_advantages(rewards[:, :4], values[:, :4], prefix, 0.9, 0.8)
    running_a = torch.zeros(2, 4, dtype=torch.float64)  # the recursion by hand, no packing
    m, rw, v = prefix.double(), rewards[:, :4].double() * prefix, values[:, :4].double() * prefix
    deltas = rw + 0.9 * torch.nn.functional.pad(v[:, 1:], (0, 1)) - v
    running = torch.zeros(2, dtype=torch.float64)
    for t in reversed(range(4)):
        running = (deltas[:, t] + 0.9 * 0.8 * running) * m[:, t]
        running_a[:, t] = running
    assert torch.equal(a, running_a) and torch.equal(r, running_a + v)
