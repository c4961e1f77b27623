"""Bradley-Terry reward modelling on preference pairs (``algo=rm``)."""

from __future__ import annotations

import torch

from rlkit.algos.preference_losses import bradley_terry_loss
from rlkit.engine import all_reduce_sum, optimizer_step, split_micro_batches
from rlkit.loops.registry import LOOPS, Loop, LoopSettings
from rlkit.models.reward_model import as_reward_model, encode_texts, reward_scores
from rlkit.run import make_engine


@LOOPS.register("reward_model", LoopSettings)
class RewardModelLoop(Loop):
    """The start model's body with a scalar head, trained so that r(prompt + chosen) >
    r(prompt + rejected); checkpoints load with ``AutoModelForSequenceClassification``."""

    supervised = True  # InstructGPT: 9e-6 for the 6B reward model, a single epoch

    def __init__(self, run, model, reference_source: str):
        super().__init__(run)
        cfg = run.cfg
        self.engine = make_engine(
            run,
            as_reward_model(model, run.tokenizer.pad_token_id),
            optim=self.optim(),
            batch_size_global=cfg.trainer.prompts_per_step_global,
            total_steps=cfg.trainer.max_steps,
        )

    def pair_texts(self, rows: list[dict]) -> list[str]:
        """prompt + chosen, prompt + rejected, interleaved: rows 2i and 2i + 1 are pair i."""
        return [p + r[side] for p, r in zip(self.run.prompts(rows), rows) for side in ("chosen", "rejected")]

    def step(self, step: int, timer):
        rows = self.next_rows(self.run.cfg.trainer.prompts_per_step_global)
        encoded = encode_texts(self.run.tokenizer, self.pair_texts(rows), self.engine.device)
        num_pairs = all_reduce_sum(float(len(rows)))
        sums = {"rm/loss": 0.0, "rm/accuracy": 0.0, "rm/margin": 0.0}

        def loss_fn(index):
            rows_index = torch.stack([2 * index, 2 * index + 1], -1).flatten()
            scores = reward_scores(self.engine, {k: v[rows_index] for k, v in encoded.items()}).view(-1, 2)
            loss = bradley_terry_loss(scores[:, 0], scores[:, 1])
            sums["rm/loss"] += float(loss.detach().sum())
            sums["rm/accuracy"] += float((scores[:, 0] > scores[:, 1]).sum())
            sums["rm/margin"] += float((scores[:, 0] - scores[:, 1]).detach().sum())
            return loss.sum() / num_pairs

        with timer.phase("update"):
            grad_norm = optimizer_step(
                self.engine, split_micro_batches(len(rows), self.engine.gradient_accumulation_steps()), loss_fn
            )
        metrics = {key: all_reduce_sum(value) / num_pairs for key, value in sums.items()}
        metrics.update(
            {
                "actor/grad_norm": grad_norm,
                "actor/lr": self.engine.get_lr()[0],
                "tokens": all_reduce_sum(float(encoded["attention_mask"].sum())),
            }
        )
        return metrics, []

    @torch.no_grad()
    def pair_rewards(self, rows: list[dict]) -> dict[str, list[float]]:
        """r(chosen) and r(rejected) of held-out pairs: what the pair evaluation compares."""
        micro = self.run.cfg.trainer.micro_batch_per_device
        texts = self.pair_texts(rows)
        scores = torch.cat(
            [
                reward_scores(
                    self.engine.module, encode_texts(self.run.tokenizer, texts[i : i + micro], self.engine.device)
                )
                for i in range(0, len(texts), micro)
            ]
        ).view(-1, 2)
        return {"chosen_reward": scores[:, 0].tolist(), "rejected_reward": scores[:, 1].tolist()}
