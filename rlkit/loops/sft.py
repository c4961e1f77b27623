"""Supervised fine-tuning on the task's reference solutions, or an environment task's expert
episodes (``algo=sft``, and the warm start that gives a random model a first non-zero reward)."""

from __future__ import annotations

from rlkit.engine import all_reduce_sum, optimizer_step, split_micro_batches
from rlkit.loops.registry import LOOPS, Loop, LoopSettings, OptimSettings
from rlkit.models.sequences import token_nll
from rlkit.run import make_engine


@LOOPS.register("sft", LoopSettings)
class SFTLoop(Loop):
    """Token-mean cross-entropy on ``solution`` given the formatted prompt. The warm start runs
    it with its own optimizer settings, batch size and step count."""

    supervised = True

    def __init__(
        self,
        run,
        model,
        reference_source: str | None = None,
        *,
        optim: OptimSettings | None = None,
        batch_size_global: int | None = None,
        max_steps: int | None = None,
    ):
        super().__init__(run)
        cfg = run.cfg
        self.batch_size_global = batch_size_global or cfg.trainer.prompts_per_step_global
        self.engine = make_engine(
            run,
            model,
            optim=optim or self.optim(),
            batch_size_global=self.batch_size_global,
            total_steps=max_steps or cfg.trainer.max_steps,
        )

    def step(self, step: int, timer):
        run = self.run
        with timer.phase("data"):
            rows = self.next_rows(self.batch_size_global)
            batch = run.task.supervised_batch(run, rows, self.engine.device)
            num_tokens = all_reduce_sum(float(batch["loss_mask"].sum()))
        losses = []

        def loss_fn(index):
            loss = token_nll(self.engine, {k: v[index] for k, v in batch.items()}).sum() / num_tokens
            losses.append(float(loss.detach()) * num_tokens)
            return loss

        with timer.phase("update"):
            micro_batches = split_micro_batches(len(rows), self.engine.gradient_accumulation_steps())
            grad_norm = optimizer_step(self.engine, micro_batches, loss_fn)
        metrics = {
            "sft/loss": all_reduce_sum(sum(losses)) / num_tokens,
            "actor/grad_norm": grad_norm,
            "actor/lr": self.engine.get_lr()[0],
            "tokens": all_reduce_sum(float(batch["attention_mask"].sum())),
        }
        return metrics, []
