"""The policy-gradient loop's update stage: ``update_epochs`` passes of ``minibatches`` optimizer
steps over one experience batch, with the policy loss and the value source's loss."""

from __future__ import annotations

import torch

from rlkit.algos import aggregate_loss
from rlkit.algos.masked import masked_mean
from rlkit.engine import all_reduce_sum, mean_over_ranks, optimizer_step, split_micro_batches, world_size


class UpdateStats:
    """Token-weighted means of the statistics of every micro-batch, averaged over processes."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, stats: dict, prefix: str, mask: torch.Tensor) -> None:
        weight = float(mask.sum())
        for key, value in stats.items():
            total = self.sums.setdefault(prefix + key, [0.0, 0.0])
            total[0] += float(value.detach()) * weight
            total[1] += weight

    def means(self) -> dict[str, float]:
        return mean_over_ranks({key: total / max(weight, 1.0) for key, (total, weight) in self.sums.items()})


class PolicyUpdate:
    """One step's optimizer updates on ``batch`` (advantages, returns and log-probs filled in)."""

    def __init__(self, loop, batch):
        self.loop, self.batch, self.settings = loop, batch, loop.settings
        self.stats = UpdateStats()
        self.objective = 0.0  # summed over micro-batches and ranks: each minibatch's policy loss, however it is split
        self.group_index = batch.group_index.to(batch.response_mask.device)
        # the response tokens the policy trains on: a rollout correction may leave responses out
        self.mask = batch.response_mask if batch.kept is None else batch.response_mask * batch.kept[:, None]
        s, reference = self.settings, loop.reference
        # whole groups stay in one micro-batch where the minibatches allow: they share one prompt pass
        # (pairwise losses need them)
        pairwise = "group_index" in loop.loss_inputs
        self.unit = s.group_size if pairwise or (len(batch) // s.group_size) % s.minibatches == 0 else 1
        # rows with all-zero advantages add no gradient when the loss vanishes there and nothing else trains on them
        self.skip_zero_advantage_rows = (
            getattr(loop.policy_loss_fn, "vanishes_at_zero_advantage", False)
            and s.entropy_coef == 0
            and (reference is None or s.kl.placement != "loss")
            and not loop.value_source.trains_with_policy
        )

    def run(self, train_policy: bool, train_values: bool = True) -> dict[str, float]:
        """The policy loss (unless the critic is still pre-training) and the value source's loss
        (added to the policy's on a shared trunk, else stepped on its own engine unless
        ``train_values`` is false: T-PPO trains its value model on other rows)."""
        s, size, values = self.settings, len(self.batch), self.loop.value_source
        grad_norms, value_grad_norms, skipped = [], [], [0, 0]
        for _ in range(s.update_epochs):
            for minibatch in self.minibatches(size):
                counts = self.counts(minibatch)
                micro_batches = self.micro_batches(minibatch)
                if train_policy or values.trains_with_policy:
                    policy_batches = (
                        self.rows_with_gradient(minibatch) if self.skip_zero_advantage_rows else micro_batches
                    )
                    skipped[0] += len(minibatch) - sum(len(b) for b in policy_batches)
                    skipped[1] += len(minibatch)
                    loss_fn = lambda index, counts=counts: self.engine_loss(index, counts, train_policy)  # noqa: E731
                    grad_norms.append(optimizer_step(self.loop.engine, policy_batches, loss_fn))
                norm = values.optimizer_step(self.batch, micro_batches, counts, self.stats) if train_values else None
                if norm is not None:
                    value_grad_norms.append(norm)
        return self.metrics(grad_norms, value_grad_norms, skipped, train_policy)

    def minibatches(self, size: int) -> list[torch.Tensor]:
        """A fresh random order of the batch (of whole groups where possible), cut into ``minibatches``."""
        unit = self.unit
        order = (torch.randperm(size // unit)[:, None] * unit + torch.arange(unit)).flatten()
        return list(order.split(size // self.settings.minibatches))

    def micro_batches(self, minibatch: torch.Tensor) -> list[torch.Tensor]:
        units = minibatch.view(-1, self.unit)
        return [
            units[i].flatten() for i in split_micro_batches(len(units), self.loop.engine.gradient_accumulation_steps())
        ]

    def counts(self, minibatch: torch.Tensor) -> tuple[float, float, int]:
        """The minibatch's global token and sequence counts and the length cap: the aggregation's normalisers."""
        kept = self.batch.kept
        sequences = len(minibatch) * world_size() if kept is None else all_reduce_sum(float(kept[minibatch].sum()))
        return all_reduce_sum(float(self.mask[minibatch].sum())), sequences, self.loop.horizon

    def engine_loss(self, index: torch.Tensor, counts, train_policy: bool):
        loss = self.policy_loss(index, counts) if train_policy else 0.0
        if self.loop.value_source.trains_with_policy:
            loss = loss + self.loop.value_source.loss_on_policy_engine(self.batch, index, counts, self.stats)
        return loss

    def policy_loss(self, index: torch.Tensor, counts) -> torch.Tensor:
        """The aggregated policy loss of rows ``index``, with the KL and entropy terms."""
        loop, batch, s = self.loop, self.batch, self.settings
        mask = self.mask[index]
        log_prob, entropy = loop.log_probs(
            loop.engine, batch.rollout, index, with_entropy=True, entropy_grad=s.entropy_coef != 0
        )
        old = batch.old_log_probs[index] if batch.old_log_probs is not None else log_prob.detach()
        inputs = {"ref_log_prob": batch.ref_log_probs, "group_index": self.group_index}
        extras = {name: inputs[name][index] for name in loop.loss_inputs}
        loss, stats = loop.policy_loss_fn(log_prob, old, batch.advantages[index], mask, s.policy_loss, **extras)
        if batch.token_weights is not None:  # a rollout correction's importance weights
            loss = loss * batch.token_weights[index]
        self.objective += float(aggregate_loss(loss.detach(), mask, s.loss_agg, *counts))  # this micro-batch's share
        if batch.ref_log_probs is not None:
            kl = loop.kl_fn(log_prob, batch.ref_log_probs[index])
            stats["kl"] = masked_mean(kl, mask)
            if s.kl.placement == "loss":
                loss = loss + loop.kl_coef * kl
        if s.entropy_coef:
            loss = loss - s.entropy_coef * entropy
        stats["entropy"] = masked_mean(entropy, mask)
        self.stats.add(stats, "actor/", mask)
        return aggregate_loss(loss, mask, s.loss_agg, *counts)

    def rows_with_gradient(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """``rows`` split into the engine's micro-batches, leaving out responses whose
        advantages are all zero: under a loss that vanishes there (and nothing else
        trained on them) they add exactly no gradient, so their forward and backward are
        skipped. The loss keeps its global normalisation, so the update is unchanged.
        Each micro-batch keeps at least one row (DeepSpeed steps every micro-batch)."""
        num_micro_batches = self.loop.engine.gradient_accumulation_steps()
        active = ((self.batch.advantages[rows] * self.mask[rows]) != 0).any(-1)
        kept = torch.cat([rows[active], rows[~active][: max(0, num_micro_batches - int(active.sum()))]])
        return [kept[part] for part in split_micro_batches(len(kept), num_micro_batches)]

    def metrics(self, grad_norms: list, value_grad_norms: list, skipped: list, train_policy: bool) -> dict[str, float]:
        metrics = self.stats.means()
        for key, norms in (("actor/grad_norm", grad_norms), ("critic/grad_norm", value_grad_norms)):
            if norms:
                metrics[key] = sum(norms) / len(norms)
        if train_policy and grad_norms:
            metrics["actor/pg_loss"] = all_reduce_sum(self.objective) / len(grad_norms)  # mean over optimizer steps
        metrics["actor/lr"] = self.loop.engine.get_lr()[0]
        if skipped[1]:
            metrics["actor/skipped_zero_advantage_frac"] = mean_over_ranks({"f": skipped[0] / skipped[1]})["f"]
        return metrics
