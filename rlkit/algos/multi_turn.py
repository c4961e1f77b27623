"""Credit assignment over turns: turn-level discounting and GiGPO.

An episode has K turns; turn k ends with reward r_k (most environments give 0 until
the last turn). Per-turn values are mapped onto the tokens of each turn's reply with
the episode's ``turn_index`` and ``loss_mask`` (:mod:`rlkit.envs.episodes`).

Episode-level advantages with any existing estimator need no new code: put each
turn's reward on the turn's last reply token (:func:`turn_rewards_to_tokens`) and pass
that as ``AdvantageInputs.token_rewards`` with ``response_mask = loss_mask``; GRPO,
RLOO, ... then score each episode by its total reward and give every reply token of
it the same advantage.

Two estimators read the turns (``AdvantageInputs.turn_index`` and ``state_keys``, which an
environment task's sample stage fills): ``gigpo`` (:func:`gigpo_advantage`) and ``turn_gae``
(:func:`turn_gae_advantage`, PPO's GAE over turns with a learned critic).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import torch

from rlkit.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    _normalise_over_batch,
    compares_within_groups,
    uses,
)
from rlkit.algos.gae import GAESettings, generalized_advantages
from rlkit.algos.masked import group_stats
from rlkit.settings import Settings


def discounted_returns(rewards: Sequence[float], gamma: float) -> list[float]:
    """R_k = sum_{j >= k} gamma^(j - k) r_j for each turn k: the turn-level discounted
    return (GiGPO, Feng et al. 2025, arXiv:2505.10978, Eq. 5). gamma discounts turns,
    not tokens: a reply of 40 tokens is one step."""
    returns, running = [0.0] * len(rewards), 0.0
    for k in reversed(range(len(rewards))):
        running = rewards[k] + gamma * running
        returns[k] = running
    return returns


def turn_values_to_tokens(
    values: Sequence[Sequence[float]], turn_index: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T): each loss token carries ``values[b][turn of the token]``; 0 elsewhere.

    ``values`` holds one list per episode, one value per turn; ``turn_index`` and
    ``loss_mask`` are the (B, T) right-padded tensors of the episodes."""
    width = max((len(v) for v in values), default=0) or 1
    table = torch.zeros(len(values), width, dtype=torch.float64)
    for b, row in enumerate(values):
        table[b, : len(row)] = torch.as_tensor(list(row), dtype=torch.float64)
    mask = loss_mask.bool()
    index = turn_index.long().clamp(0, width - 1)
    return torch.where(mask, table.gather(1, index), torch.zeros((), dtype=torch.float64)).float()


def turn_rewards_to_tokens(
    rewards: Sequence[Sequence[float]], turn_index: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T) token rewards: each turn's reward on the last loss token of that turn, 0
    elsewhere; the ``token_rewards`` under which every sequence-level estimator scores an
    episode by its total reward."""
    mask = loss_mask.bool()
    next_turn = torch.cat([turn_index[:, 1:], torch.full_like(turn_index[:, :1], -1)], dim=1)
    next_is_loss = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    last_of_turn = mask & ~(next_is_loss & (next_turn == turn_index))
    per_token = turn_values_to_tokens(rewards, turn_index, loss_mask)
    return torch.where(last_of_turn, per_token, torch.zeros_like(per_token))


def turn_returns_to_tokens(
    rewards: Sequence[Sequence[float]], gamma: float, turn_index: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T): every reply token carries its turn's discounted return R_k (:func:`discounted_returns`)."""
    return turn_values_to_tokens([discounted_returns(r, gamma) for r in rewards], turn_index, loss_mask)


def turn_gae(
    rewards: Sequence[float], values: Sequence[float], gamma: float, lam: float, bootstrap: float = 0.0
) -> tuple[list[float], list[float]]:
    """Generalized advantage estimation over turns (Schulman et al. 2016, Eq. 16, with a
    turn as the time step): delta_k = r_k + gamma V(s_{k+1}) - V(s_k) and
    A_k = sum_j (gamma lam)^j delta_{k+j}; returns (A, A + V), one value per turn.

    ``values[k]`` is V(s_k), the critic's value of the state reply k is made in (read at
    the token before the reply: :func:`turn_value_positions`). V(s_K) after the last
    reply is ``bootstrap``: 0 for an episode the environment ended, the critic's estimate
    for one a limit cut off."""
    if len(rewards) != len(values):
        raise ValueError(f"turn_gae: {len(rewards)} rewards but {len(values)} values")
    advantages, running, next_value = [0.0] * len(rewards), 0.0, bootstrap
    for k in reversed(range(len(rewards))):
        delta = rewards[k] + gamma * next_value - values[k]
        running = delta + gamma * lam * running
        advantages[k], next_value = running, values[k]
    return advantages, [a + v for a, v in zip(advantages, values)]


def turn_value_positions(turn_index: torch.Tensor, loss_mask: torch.Tensor) -> list[list[int]]:
    """For each episode, the position of the token before each reply: the last token of
    the context the reply was sampled from, where a critic reads V(s_k)."""
    mask = loss_mask.bool()
    starts = mask & ~torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
    return [(row.nonzero().flatten() - 1).tolist() for row in starts]


@dataclasses.dataclass
class GiGPOAdvantages:
    """Per-episode episode-level advantages, and per-turn step-level and combined ones."""

    episode: list[float]  # A^E(tau_i)
    step: list[list[float]]  # A^S(a_k^(i))
    combined: list[list[float]]  # A^E + omega * A^S
    anchor_group_sizes: list[list[int]]  # |G^S| of each turn's anchor state (1: no other trajectory reached it)


@torch.no_grad()
def gigpo_advantages(
    turn_rewards: Sequence[Sequence[float]],
    state_keys: Sequence[Sequence[Hashable]],
    group_ids: Sequence[Hashable],
    gamma: float = 0.95,
    omega: float = 1.0,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> GiGPOAdvantages:
    """Group-in-Group Policy Optimization (Feng et al. 2025, "Group-in-Group Policy
    Optimization for LLM Agent Training", arXiv:2505.10978, Sec. 4; equation numbers
    as in the authors' verl-agent code, gigpo/core_gigpo.py).

    Episodes i of one group (``group_ids``: the same instance, same initial state) have
    per-turn rewards r_k^(i) and states s_k^(i) (``state_keys``: the state each reply
    was made in).

    Episode level (Eq. 3): R(tau_i) = sum_k r_k^(i) and
        A^E(tau_i) = (R(tau_i) - mean_j R(tau_j)) / F_norm({R(tau_j)}).
    Step level: R_k^(i) = sum_{j >= k} gamma^(j-k) r_j^(i) (Eq. 5); the anchor group of
    a state s~ gathers every turn of every episode of the group made in s~ (Eq. 6):
        G^S(s~) = {(a_k^(i), R_k^(i)) : s_k^(i) = s~}, and
        A^S(a_k^(i)) = (R_k^(i) - mean over G^S(s~)) / F_norm(returns in G^S(s~)) (Eq. 7).
    Combined (Eq. 8): A(a_k^(i)) = A^E(tau_i) + omega * A^S(a_k^(i)).

    F_norm is the (unbiased) standard deviation plus ``eps`` with ``norm_by_std``, else 1
    (the paper reports both; the authors' code defaults to 1, "mean_norm"). A group or
    anchor group of one gets advantage 0 at that level (nothing to compare it with).
    The paper's defaults: gamma = 0.95, omega = 1.
    """
    if not len(turn_rewards) == len(state_keys) == len(group_ids):
        raise ValueError("gigpo_advantages: one entry per episode in turn_rewards, state_keys and group_ids")
    for rewards, keys in zip(turn_rewards, state_keys):
        if len(rewards) != len(keys):
            raise ValueError(f"gigpo_advantages: {len(rewards)} rewards but {len(keys)} state keys in one episode")
    group_of = dense_ids(group_ids)
    totals = torch.tensor([float(sum(r)) for r in turn_rewards], dtype=torch.float64)
    episode = normalise_in_groups(totals, group_of, norm_by_std, eps)

    steps = [(i, k) for i, keys in enumerate(state_keys) for k in range(len(keys))]
    returns = [discounted_returns(r, gamma) for r in turn_rewards]
    step_returns = torch.tensor([returns[i][k] for i, k in steps], dtype=torch.float64)
    anchor_of = dense_ids([(group_ids[i], state_keys[i][k]) for i, k in steps])
    step_values = normalise_in_groups(step_returns, anchor_of, norm_by_std, eps)
    sizes = torch.bincount(anchor_of)[anchor_of] if steps else torch.zeros(0, dtype=torch.long)

    step, size_rows = [[0.0] * len(keys) for keys in state_keys], [[0] * len(keys) for keys in state_keys]
    for (i, k), value, size in zip(steps, step_values.tolist(), sizes.tolist()):
        step[i][k], size_rows[i][k] = value, size
    episode_values = episode.tolist()
    combined = [[episode_values[i] + omega * a for a in row] for i, row in enumerate(step)]
    return GiGPOAdvantages(episode_values, step, combined, size_rows)


def dense_ids(keys: Sequence[Hashable]) -> torch.Tensor:
    """(N,) long: equal keys share an id (0, 1, ... in order of first appearance)."""
    ids: dict[Hashable, int] = {}
    return torch.tensor([ids.setdefault(key, len(ids)) for key in keys], dtype=torch.long)


def normalise_in_groups(values: torch.Tensor, group: torch.Tensor, by_std: bool, eps: float) -> torch.Tensor:
    """(v - mean of v's group) / (std of v's group + eps), or without the division; a
    group whose values are all equal (a group of one included) gives 0."""
    if values.numel() == 0:
        return values
    mean, std, _ = group_stats(values, group)
    centred = values - mean
    if not by_std:
        return centred
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


# --------------------------------------------------------------------------- registered estimators


def turn_table(
    token_values: torch.Tensor, turn_index: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, K) the sum of ``token_values`` over each turn's masked tokens, (B, K) which turns
    exist), K the most turns of an episode; a turn exists when it holds a masked token."""
    mask = mask.bool()
    width = int(turn_index[mask].max()) + 1 if mask.any() else 1
    index = turn_index.long().clamp(0, width - 1)
    sums = torch.zeros(len(mask), width, dtype=torch.float64, device=mask.device)
    sums.scatter_add_(1, index, torch.where(mask, token_values.to(torch.float64), 0.0))
    counts = torch.zeros(len(mask), width, device=mask.device).scatter_add_(1, index, mask.float())
    return sums, counts > 0


def first_turn_tokens(turn_index: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, K) the position of each turn's first masked token (its reply's first token; 0 for a turn
    that does not exist)."""
    mask = mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    beyond = torch.full_like(positions, mask.shape[1])
    first = torch.full((len(mask), width), mask.shape[1], dtype=torch.long, device=mask.device)
    first.scatter_reduce_(1, turn_index.long().clamp(0, width - 1), torch.where(mask, positions, beyond), "amin")
    return torch.where(first == mask.shape[1], 0, first)


def spread_over_turns(per_turn: torch.Tensor, turn_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T): each masked token carries its turn's value from ``per_turn`` (B, K); 0 elsewhere."""
    index = turn_index.long().clamp(0, per_turn.shape[1] - 1)
    return per_turn.gather(1, index) * mask.to(per_turn.dtype)


@dataclasses.dataclass
class GiGPOSettings(Settings):
    gamma: float = 0.95  # discount of the step-level returns, per turn (paper: 0.95)
    omega: float = 1.0  # weight of the step-level advantage (paper: 1)
    # F_norm: the std (true) or 1 (false: the authors' code's "mean_norm", its scripts' choice; the paper allows both)
    norm_by_std: bool = False
    eps: float = 1e-6  # added to the std before dividing

    def check(self) -> None:
        self.require(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        self.require_non_negative("omega")
        self.require(self.eps > 0 or not self.norm_by_std, "eps", "must be positive when norm_by_std is true")


@ADVANTAGE_ESTIMATORS.register("gigpo", GiGPOSettings)
@uses("turn_index", "state_keys")
@compares_within_groups
@torch.no_grad()
def gigpo_advantage(inputs: AdvantageInputs, settings: GiGPOSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """GiGPO (:func:`gigpo_advantages`) over a batch of episodes: each turn's reward is the sum of
    its tokens' rewards (the environment's reward, plus any normalisation or KL placed in the
    reward), the episode groups are ``group_index``, the anchor states ``state_keys``; every token
    of turn k carries A^E + omega A^S of that turn."""
    if inputs.turn_index is None or inputs.state_keys is None:
        raise ValueError("advantage 'gigpo' needs episodes (turn_index, state_keys): an environment task")
    rewards, exists = turn_table(inputs.token_rewards, inputs.turn_index, inputs.response_mask)
    turn_rewards = [row[keep].tolist() for row, keep in zip(rewards.cpu(), exists.cpu())]
    result = gigpo_advantages(
        turn_rewards,
        inputs.state_keys,
        inputs.group_index.tolist(),
        settings.gamma,
        settings.omega,
        settings.norm_by_std,
        settings.eps,
    )
    per_turn = torch.zeros(rewards.shape, dtype=torch.float64)
    for row, values in enumerate(result.combined):
        per_turn[row, : len(values)] = torch.tensor(values, dtype=torch.float64)
    advantages = spread_over_turns(per_turn.to(rewards.device), inputs.turn_index, inputs.response_mask).float()
    return advantages, advantages


@ADVANTAGE_ESTIMATORS.register("turn_gae", GAESettings)
@uses("values", "turn_index")
@torch.no_grad()
def turn_gae_advantage(inputs: AdvantageInputs, settings: GAESettings) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's GAE with a turn as the time step (Schulman et al. 2016, Eq. 16, over turns): r_k is
    the sum of turn k's token rewards, V(s_k) the critic's value at the first token of reply k
    (the state the reply is made in), V = 0 after an episode's last turn (a limit's cut is taken
    as its end); every token of turn k carries A_k, and R_k = A_k + V(s_k) is the critic's target
    there. ``norm_by_std`` whitens the advantages over the batch's sampled tokens, as ``gae``."""
    if inputs.values is None or inputs.turn_index is None:
        raise ValueError(
            "advantage 'turn_gae' needs critic values and episodes: algo/value_source=critic, an environment task"
        )
    mask = inputs.response_mask
    rewards, exists = turn_table(inputs.token_rewards, inputs.turn_index, mask)
    values = inputs.values.to(torch.float64).gather(1, first_turn_tokens(inputs.turn_index, mask, rewards.shape[1]))
    advantages, returns = generalized_advantages(rewards, values, exists, settings.gamma, settings.lam)
    advantages = spread_over_turns(advantages, inputs.turn_index, mask)
    returns = spread_over_turns(returns, inputs.turn_index, mask)
    if settings.norm_by_std:
        advantages = _normalise_over_batch(advantages, mask, settings.eps, divide=True)
    return advantages.float(), returns.float()
