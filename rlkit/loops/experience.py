"""The experience batch: one step's sampled responses and everything the stages add to them."""

from __future__ import annotations

import dataclasses

import torch

from rlkit.algos.masked import group_stats
from rlkit.algos.multi_turn import turn_rewards_to_tokens
from rlkit.rollout.generate import Rollout


@dataclasses.dataclass
class Experience:
    """Sampled responses of whole groups (the samples of one prompt adjacent) and their rewards,
    extended stage by stage: log-probs, values, rewards per token, advantages.

    rows / prompts / completions / scores: one entry per sample (``scores``: the weighted reward total,
    or an episode's return).
    reward_terms: each reward term's score per sample.
    episodes: for an environment task, each sample's multi-turn episode (:class:`rlkit.envs.episodes.Episode`:
    its turns, their rewards and state keys); the response is everything after the opening prompt.
    The tensors are (B, T) over response tokens, (B,) for ``baseline_scores`` and
    ``bootstrap_values``; a stage that does not apply leaves its field None.
    """

    rows: list[dict]
    prompts: list[str]
    rollout: Rollout
    completions: list[str]
    scores: list[float]
    reward_terms: dict[str, list[float]]
    group_size: int
    episodes: list | None = None
    old_log_probs: torch.Tensor | None = None  # under the policy that sampled (pi_old), recomputed by the trainer
    ref_log_probs: torch.Tensor | None = None  # under the frozen reference policy
    values: torch.Tensor | None = None  # V(s_t) from the value source (critic or Monte-Carlo)
    step_ids: torch.Tensor | None = None  # the step of its response each token belongs to (VinePPO)
    baseline_scores: torch.Tensor | None = None  # a per-sample baseline score (ReMax's greedy reward)
    bootstrap_values: torch.Tensor | None = None  # V after the last token of responses that go on (T-PPO)
    token_rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None  # on the policy-gradient loss per token (a rollout correction)
    kept: torch.Tensor | None = None  # (B,) False: the response is left out of the update (a rollout correction)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_groups(self) -> int:
        return len(self.rows) // self.group_size

    @property
    def group_index(self) -> torch.Tensor:
        return torch.arange(self.num_groups).repeat_interleave(self.group_size)

    @property
    def response_mask(self) -> torch.Tensor:
        """(B, T) 1 on the response tokens the policy sampled: what the loss, KL and advantages
        cover (a multi-turn episode's observation tokens are part of the response, not of this)."""
        return self.rollout.sampled_mask

    @property
    def turn_index(self) -> torch.Tensor | None:
        """(B, T) the turn of each response token (episodes only)."""
        if self.episodes is None:
            return None
        width = self.rollout.response_ids.shape[1]
        rows = [e.turn_index[e.prompt_length :] for e in self.episodes]
        return torch.tensor([row + [0] * (width - len(row)) for row in rows], device=self.response_mask.device)

    @property
    def turn_rewards(self) -> list[list[float]] | None:
        return None if self.episodes is None else [e.rewards for e in self.episodes]

    @property
    def state_keys(self) -> list[list] | None:
        return None if self.episodes is None else [e.state_keys for e in self.episodes]

    def reward_tokens(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, T) each sample's score on its last sampled token; an episode's rewards each on the
        last token of its own turn instead, the difference between its (normalised) score and its
        return on its last token, so that every episode's token rewards still sum to its score."""
        mask = self.response_mask
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # the last sampled token of each row
        rewards = torch.zeros(mask.shape, dtype=torch.float32, device=scores.device)
        rows = torch.arange(len(scores), device=scores.device)
        rewards[rows, last] = scores
        if self.episodes is not None:
            returns = torch.tensor([e.total_reward for e in self.episodes], dtype=torch.float32, device=scores.device)
            rewards[rows, last] -= returns
            rewards += turn_rewards_to_tokens(self.turn_rewards, self.turn_index, mask).to(scores.device)
        return rewards

    def samples(self) -> list[dict]:
        """Rows of the completions table."""
        return [
            {"prompt": p, "completion": c, "reward": r, "answer": row.get("answer", "")}
            for p, c, r, row in zip(self.prompts, self.completions, self.scores, self.rows)
        ]

    def select_groups(self, groups: list[int]) -> Experience:
        """The sampled part (before any later stage) of the given groups."""
        index = [g * self.group_size + i for g in groups for i in range(self.group_size)]
        pick = lambda values: [values[i] for i in index]  # noqa: E731
        return Experience(
            rows=pick(self.rows),
            prompts=pick(self.prompts),
            rollout=self.rollout.select(torch.tensor(index, dtype=torch.long)),
            completions=pick(self.completions),
            scores=pick(self.scores),
            reward_terms={k: pick(v) for k, v in self.reward_terms.items()},
            group_size=self.group_size,
            episodes=None if self.episodes is None else pick(self.episodes),
        )

    def first_groups(self, count: int) -> Experience:
        return self.select_groups(list(range(min(count, self.num_groups))))

    def split_by_variance(self) -> tuple[Experience, Experience]:
        """(groups whose rewards differ, groups whose rewards are all equal)."""
        _, std, _ = group_stats(torch.tensor(self.scores), self.group_index)
        varied = (std.view(self.num_groups, self.group_size)[:, 0] > 0).tolist()
        return (
            self.select_groups([g for g, v in enumerate(varied) if v]),
            self.select_groups([g for g, v in enumerate(varied) if not v]),
        )

    @staticmethod
    def concat(parts: list[Experience], pad_token_id: int) -> Experience:
        """The sampled part of several batches, one after the other."""
        join = lambda name: [v for p in parts for v in getattr(p, name)]  # noqa: E731
        return Experience(
            rows=join("rows"),
            prompts=join("prompts"),
            rollout=Rollout.concat([p.rollout for p in parts], pad_token_id),
            completions=join("completions"),
            scores=join("scores"),
            reward_terms={k: [v for p in parts for v in p.reward_terms[k]] for k in parts[0].reward_terms},
            group_size=parts[0].group_size,
            episodes=None if parts[0].episodes is None else join("episodes"),
        )
