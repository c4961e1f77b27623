"""PPO's critic inside the policy-gradient loop: values of the rollout before the
update, a value loss during it. On the policy's trunk (``shared_head``: the policy
engine trains both) or a separate copy of the starting model with its own engine."""

from __future__ import annotations

import torch

from rlkit.algos import aggregate_loss
from rlkit.algos.value_losses import VALUE_LOSSES
from rlkit.models import configure_for_training, load_pretrained
from rlkit.models.value_head import attach_value_head, token_values
from rlkit.run import make_engine


class Critic:
    def __init__(self, run, policy_engine, start_dir: str, batch_size_global: int, total_steps: int):
        self.run, self.algo = run, run.cfg.algo
        self.shared = self.algo.critic.type == "shared_head"
        if self.shared:
            self.engine = policy_engine  # the value head was attached before the engine was built
        else:
            model = configure_for_training(load_pretrained(start_dir, run.cfg.model, run.cfg.hardware), run.cfg.model)
            attach_value_head(model)
            self.engine = make_engine(
                run, model, lr=self.algo.critic.lr, batch_size_global=batch_size_global, total_steps=total_steps
            )
        self.loss_fn = VALUE_LOSSES.get(self.algo.critic.loss)

    @torch.no_grad()
    def values(self, rollout) -> torch.Tensor:
        """(B, T) V(s_t) of every response token, micro-batched; 0 on padding."""
        micro = self.run.cfg.trainer.micro_batch_per_device
        parts = [
            token_values(
                self.engine,
                rollout.sequences[i : i + micro],
                rollout.attention_mask[i : i + micro],
                rollout.response_ids.shape[1],
            )
            for i in range(0, len(rollout), micro)
        ]
        return torch.cat(parts) * rollout.response_mask

    def loss(self, index, rollout, returns, old_values, counts) -> tuple[torch.Tensor, dict]:
        """The aggregated value loss of rows ``index`` (normalised by the minibatch's global counts)."""
        mask = rollout.response_mask[index]
        values = token_values(
            self.engine, rollout.sequences[index], rollout.attention_mask[index], rollout.response_ids.shape[1]
        )
        loss, stats = self.loss_fn(values, old_values[index], returns[index], mask, self.algo)
        aggregated = aggregate_loss(loss, mask, self.algo.loss_agg, *counts)
        return aggregated, {"value_loss": aggregate_loss(loss.detach(), mask, self.algo.loss_agg), **stats}

    def extra_engines(self) -> dict:
        """Engines the checkpoint must hold besides the policy's."""
        return {} if self.shared else {"critic": self.engine}
