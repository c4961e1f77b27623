"""Drawing prompts: a seeded reshuffle per epoch, resumable at any position."""

from __future__ import annotations

import torch

from rlkit.engine import rank, world_size


class PromptSampler:
    def __init__(self, num_rows: int, seed: int):
        if num_rows == 0:
            raise ValueError("the training split is empty")
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def next_global(self, count: int) -> list[int]:
        """The next ``count`` row indices of the run (the same on every rank)."""
        indices: list[int] = []
        while len(indices) < count:
            order = self._order()
            take = order[self.position : self.position + count - len(indices)]
            indices += take
            self.position += len(take)
            if self.position >= self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def next_local(self, count_global: int) -> list[int]:
        """This rank's contiguous share of the next global batch."""
        indices = self.next_global(count_global)
        share = count_global // world_size()
        return indices[rank() * share : (rank() + 1) * share]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
