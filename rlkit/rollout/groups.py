"""Sampled responses kept as whole groups (all samples of one prompt adjacent)."""

from __future__ import annotations

import dataclasses

import torch

from rlkit.algos.masked import group_stats
from rlkit.rollout.generate import Rollout


@dataclasses.dataclass
class Groups:
    """Sampled responses of whole groups (samples of one prompt adjacent) and their rewards."""

    rows: list[dict]
    prompts: list[str]
    rollout: Rollout
    completions: list[str]
    totals: list[float]
    per_term: dict[str, list[float]]
    baseline: list[float] | None
    group_size: int

    @property
    def num_groups(self) -> int:
        return len(self.rows) // self.group_size

    @property
    def group_index(self) -> torch.Tensor:
        return torch.arange(self.num_groups).repeat_interleave(self.group_size)

    def select_groups(self, groups: list[int]) -> Groups:
        index = [g * self.group_size + i for g in groups for i in range(self.group_size)]
        pick = lambda values: [values[i] for i in index]  # noqa: E731
        return Groups(
            pick(self.rows),
            pick(self.prompts),
            self.rollout.select(torch.tensor(index, dtype=torch.long)),
            pick(self.completions),
            pick(self.totals),
            {k: pick(v) for k, v in self.per_term.items()},
            None if self.baseline is None else pick(self.baseline),
            self.group_size,
        )

    def first_groups(self, count: int) -> Groups:
        return self.select_groups(list(range(min(count, self.num_groups))))

    def split_by_variance(self) -> tuple[Groups, Groups]:
        """(groups whose rewards differ, groups whose rewards are all equal)."""
        _, std, _ = group_stats(torch.tensor(self.totals), self.group_index)
        varied = (std.view(self.num_groups, self.group_size)[:, 0] > 0).tolist()
        return (
            self.select_groups([g for g, v in enumerate(varied) if v]),
            self.select_groups([g for g, v in enumerate(varied) if not v]),
        )

    @staticmethod
    def concat(parts: list[Groups], pad_token_id: int) -> Groups:
        join = lambda name: [v for p in parts for v in getattr(p, name)]  # noqa: E731
        baseline = None if parts[0].baseline is None else join("baseline")
        return Groups(
            join("rows"),
            join("prompts"),
            Rollout.concat([p.rollout for p in parts], pad_token_id),
            join("completions"),
            join("totals"),
            {k: [v for p in parts for v in p.per_term[k]] for k in parts[0].per_term},
            baseline,
            parts[0].group_size,
        )
