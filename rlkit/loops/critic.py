"""PPO's learned critic as a value source: V(s_t) of every response token before the update, a
value loss during it. ``critic`` is a separate copy of the starting model with a value head
and its own engine (under LoRA the copy gets its own adapter, so only the adapter and the head
train); ``value_head`` is a value head on the policy's own trunk, trained through the policy's
loss (one engine, less memory; under LoRA the head and the policy's adapter train)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import MISSING

from rlkit.algos import aggregate_loss
from rlkit.algos.value_losses import VALUE_LOSSES
from rlkit.engine import optimizer_step
from rlkit.loops.values import VALUE_SOURCES, ValueSource
from rlkit.models import configure_for_training, load_pretrained
from rlkit.models.value_head import attach_value_head, token_values
from rlkit.run import make_engine, with_lora
from rlkit.settings import Settings


@dataclass
class ValueHeadSettings(Settings):
    coef: float = 0.5  # weight of the value loss added to the policy's loss (PPO's c1)
    pretrain_steps: int = 0  # the first RL steps train only the critic (PPO-max's critic pre-training); 0 = off
    loss: Any = MISSING  # the value loss (algo/value_source/loss=clipped | mse)

    def check(self) -> None:
        self.require_non_negative("coef", "pretrain_steps")


@dataclass
class CriticSettings(Settings):
    lr: float | None = None  # the critic's learning rate; null = the policy's
    pretrain_steps: int = 0  # the first RL steps train only the critic (PPO-max's critic pre-training); 0 = off
    loss: Any = MISSING  # the value loss (algo/value_source/loss=clipped | mse)

    def check(self) -> None:
        self.require(self.lr is None or self.lr > 0, "lr", "must be positive (or null: the policy's)")
        self.require_non_negative("pretrain_steps")


class LearnedValues(ValueSource):
    """What both critics share: values before the update, the value loss, pre-training."""

    provides = ("values",)

    def __init__(self, loop, settings, start_dir: str):
        super().__init__(loop, settings, start_dir)
        self.engine = loop.engine
        self.loss_fn = VALUE_LOSSES.get(settings.loss.name)

    def estimate(self, batch, timer) -> dict[str, float]:
        with timer.phase("values"):
            batch.values = self.values(batch.rollout)
        return {}

    @torch.no_grad()
    def values(self, rollout) -> torch.Tensor:
        """(B, T) V(s_t) of every response token, micro-batched; 0 on padding."""
        micro = self.loop.run.cfg.trainer.micro_batch_per_device
        width = rollout.response_ids.shape[1]
        parts = [
            token_values(self.engine, rollout.sequences[i : i + micro], rollout.attention_mask[i : i + micro], width)
            for i in range(0, len(rollout), micro)
        ]
        return torch.cat(parts) * rollout.sampled_mask

    def loss(self, rollout, returns, old_values, index, counts, stats) -> torch.Tensor:
        """The aggregated value loss of rows ``index`` (normalised by the minibatch's global counts)."""
        mask = rollout.sampled_mask[index]
        values = token_values(
            self.engine, rollout.sequences[index], rollout.attention_mask[index], rollout.response_ids.shape[1]
        )
        loss, terms = self.loss_fn(values, old_values[index], returns[index], mask, self.settings.loss)
        agg = self.loop.settings.loss_agg
        stats.add({"value_loss": aggregate_loss(loss.detach(), mask, agg), **terms}, "critic/", mask)
        return aggregate_loss(loss, mask, agg, *counts)

    def trains_policy(self, step: int) -> bool:
        return step > self.settings.pretrain_steps


@VALUE_SOURCES.register("value_head", ValueHeadSettings)
class SharedValueHead(LearnedValues):
    trains_with_policy = True

    @staticmethod
    def prepare(model, settings) -> None:
        attach_value_head(model)

    def loss_on_policy_engine(self, batch, index, counts, stats) -> torch.Tensor:
        return self.settings.coef * self.loss(batch.rollout, batch.returns, batch.values, index, counts, stats)


@VALUE_SOURCES.register("critic", CriticSettings)
class Critic(LearnedValues):
    def __init__(self, loop, settings, start_dir: str):
        super().__init__(loop, settings, start_dir)
        run = loop.run
        model = load_pretrained(start_dir, run.cfg.model, run.cfg.hardware)
        model = configure_for_training(with_lora(model, run.cfg.model.lora), run.cfg.model)  # its own adapter
        attach_value_head(model)
        optim = loop.optim()
        optim = dataclasses.replace(optim, lr=settings.lr or optim.lr)
        self.engine = make_engine(
            run, model, optim=optim, batch_size_global=loop.minibatch_size_global(), total_steps=loop.optimizer_steps
        )

    def optimizer_step(self, batch, micro_batches, counts, stats) -> float:
        return self.step_on(batch.rollout, batch.returns, batch.values, micro_batches, counts, stats)

    def step_on(self, rollout, returns, old_values, micro_batches, counts, stats) -> float:
        """One optimizer step of the value loss over ``micro_batches`` of ``rollout``."""
        return optimizer_step(
            self.engine, micro_batches, lambda index: self.loss(rollout, returns, old_values, index, counts, stats)
        )

    def extra_engines(self) -> dict:
        return {"critic": self.engine}
