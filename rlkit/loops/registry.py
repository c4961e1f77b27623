"""The loop registry, the settings every loop shares, and the :class:`Loop` base class.

A loop's settings dataclass is the schema of the whole ``algo`` node: an ``algo/`` preset
picks its loop (``defaults: [loop/policy_gradient@_here_, ...]``) and so which settings exist.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from omegaconf import MISSING

from rlkit.data import PromptSampler
from rlkit.registry import Registry
from rlkit.settings import Checked, Settings

LOOPS: Registry = Registry("training loop", group="algo/loop", key="algo", name_field="loop")


@dataclass
class OptimSettings(Checked):
    """AdamW, its learning-rate schedule and gradient clipping (``algo.optim``)."""

    lr: float | None = None  # null: the model preset's learning rate (model.lr; model.sft_lr for supervised loops)
    schedule: str = "constant"  # constant | linear | cosine (decay to 0 at trainer.max_steps)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables

    def check(self) -> None:
        self.require(self.lr is None or self.lr > 0, "lr", "must be positive (or null: the model preset's)")
        self.require_choice("schedule", ("constant", "linear", "cosine"))
        self.require_non_negative("warmup_steps", "weight_decay", "max_grad_norm")
        self.require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)"
        )


@dataclass
class SamplingSettings(Checked):
    """The behaviour policy's sampling distribution (``algo.sampling``); responses are at most
    ``task.max_new_tokens`` long."""

    temperature: float = 1.0  # rollout sampling temperature; log-probs are scored at the same temperature
    top_p: float = 1.0  # nucleus sampling; 1.0 disables it
    min_new_tokens: int = 0  # EOS is masked until a response has this many tokens (0 = off)

    def check(self) -> None:
        self.require_positive("temperature")
        self.require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self.require_non_negative("min_new_tokens")


@dataclass
class LoopSettings(Settings):
    """What every loop reads. ``name`` is the preset's name, ``loop`` the registered loop."""

    loop: str = MISSING
    optim: OptimSettings = field(default_factory=OptimSettings)


class Loop:
    """Subclasses build ``self.engine`` and implement :meth:`step`."""

    engine = None
    rollout = None  # the rollout backend of a loop that samples (rlkit/rollout/backends.py)
    supervised = False  # the learning rate defaults to model.sft_lr instead of model.lr

    def __init__(self, run):
        self.run = run
        self.settings = run.algo
        self.sampler = PromptSampler(len(run.train_rows), run.cfg.seed)

    def step(self, step: int, timer) -> tuple[dict[str, float], list[dict]]:
        """One optimizer iteration: (metrics, sample rows for the completions table)."""
        raise NotImplementedError

    def sync_rollout(self, timer) -> None:
        """After the update stage: the rollout backend takes the updated weights (``time/weight_sync``)."""
        if self.rollout is not None:
            with timer.phase("weight_sync"):
                self.rollout.sync_weights()

    def close(self) -> None:
        """At the end of the run: free what the rollout backend holds (an inference engine's memory)."""
        if self.rollout is not None:
            self.rollout.close()

    def optim(self) -> OptimSettings:
        """``algo.optim`` with the learning rate resolved (null: the model preset's)."""
        optim = self.settings.optim
        model = self.run.cfg.model
        return dataclasses.replace(optim, lr=optim.lr or (model.sft_lr if self.supervised else model.lr))

    def next_rows(self, count_global: int) -> list[dict]:
        return [self.run.train_rows[i] for i in self.sampler.next_local(count_global)]

    def extra_engines(self) -> dict:
        """Engines besides ``self.engine`` (e.g. a separate critic) that checkpoints save and restore, by name."""
        return {}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
