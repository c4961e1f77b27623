"""Supervised fine-tuning on the task's reference solutions (``algo=sft``, and
the warm start that gives a random model a first non-zero reward)."""

from __future__ import annotations

import torch

from rlkit.engine import all_reduce_sum, optimizer_step, split_micro_batches
from rlkit.loops.registry import LOOPS, Loop
from rlkit.rollout.logprobs import position_ids_from_mask
from rlkit.run import make_engine


def supervised_batch(tokenizer, prompts: list[str], targets: list[str], device) -> dict[str, torch.Tensor]:
    """Prompt + target + EOS, right-padded; ``loss_mask`` covers only the target and EOS."""
    rows = []
    for prompt, target in zip(prompts, targets):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + target_ids, [0] * len(prompt_ids) + [1] * len(target_ids)))
    width = max(len(ids) for ids, _ in rows)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(ids, tokenizer.pad_token_id) for ids, _ in rows], device=device),
        "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in rows], device=device),
        "loss_mask": torch.tensor([pad(mask, 0) for _, mask in rows], device=device),
    }


def token_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Negative log-likelihood of each next token, (B, L-1), zero where not trained on."""
    logits = (
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids_from_mask(batch["attention_mask"]),
            use_cache=False,
        )
        .logits[:, :-1]
        .float()
    )
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    return nll * batch["loss_mask"][:, 1:]


@LOOPS.register("sft")
class SFTLoop(Loop):
    """Token-mean cross-entropy on ``solution`` given the formatted prompt."""

    def __init__(
        self,
        run,
        model,
        reference_source: str | None = None,
        *,
        lr: float | None = None,
        batch_size_global: int | None = None,
        max_steps: int | None = None,
    ):
        super().__init__(run)
        cfg = run.cfg
        self.batch_size_global = batch_size_global or cfg.trainer.prompts_per_step_global
        self.engine = make_engine(
            run,
            model,
            lr=lr or cfg.algo.lr,
            batch_size_global=self.batch_size_global,
            total_steps=max_steps or cfg.trainer.max_steps,
        )

    def step(self, step: int, timer):
        run = self.run
        with timer.phase("data"):
            rows = self.next_rows(self.batch_size_global)
            batch = supervised_batch(
                run.tokenizer, run.prompts(rows), [r["solution"] for r in rows], self.engine.device
            )
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
