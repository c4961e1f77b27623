"""The loop registry and what every loop shares."""

from __future__ import annotations

from rlkit.data import PromptSampler
from rlkit.registry import Registry

LOOPS: Registry = Registry("training loop")


class Loop:
    """Subclasses build ``self.engine`` and implement :meth:`step`."""

    engine = None

    def __init__(self, run):
        self.run = run
        self.sampler = PromptSampler(len(run.train_rows), run.cfg.seed)

    def step(self, step: int, timer) -> tuple[dict[str, float], list[dict]]:
        """One optimizer iteration: (metrics, sample rows for the completions table)."""
        raise NotImplementedError

    def next_rows(self, count_global: int) -> list[dict]:
        return [self.run.train_rows[i] for i in self.sampler.next_local(count_global)]

    def extra_engines(self) -> dict:
        """Engines besides ``self.engine`` (e.g. a separate critic) that checkpoints save and restore, by name."""
        return {}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
