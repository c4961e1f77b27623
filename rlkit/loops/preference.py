"""Training on ranked responses: the DPO family, RRHF and PRO on a preference task
(``algo.loop=preference``), and online DPO, RSO and rejection-sampling fine-tuning on
responses sampled from the policy and ranked by the reward (``online_preference``).

responses (dataset, or sample -> reward -> selection) -> log-probs under the policy
and the frozen reference -> ``algo.preference_loss`` -> update. Which loss and which
selection are config; this file never branches on an algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import MISSING

from rlkit.algos.preference_losses import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    ResponseSet,
    implicit_reward_beta,
    pair_accuracy,
)
from rlkit.algos.selection import RESPONSE_SELECTIONS
from rlkit.engine import all_reduce_sum, optimizer_step, split_micro_batches
from rlkit.loops.policy_gradient import build_rollout
from rlkit.loops.registry import LOOPS, Loop, LoopSettings, SamplingSettings
from rlkit.loops.sampling import repeat
from rlkit.metrics import mean_std
from rlkit.models.sequences import encode_response_sets, pad_rows, score_response_sets, sequence_log_probs
from rlkit.run import make_engine, reference_policy


@dataclass
class PreferenceSettings(LoopSettings):
    preference_loss: Any = (
        MISSING  # preference loss (algo/preference_loss=sigmoid | ipo | hinge | cdpo | robust | rpo | ...)
    )
    reference: str = (
        "model"  # model: the frozen start model scores each batch | precomputed: its log-probs once, then freed
    )

    def check(self) -> None:
        self.require_choice("reference", ("model", "precomputed"))


@dataclass
class OnlinePreferenceSettings(LoopSettings):
    preference_loss: Any = MISSING  # preference loss (algo/preference_loss=...)
    selection: Any = (
        MISSING  # sampled responses -> training set (algo/selection=best_worst | rejection | above_threshold)
    )
    group_size: int = 2  # responses sampled per prompt
    sampling: SamplingSettings = field(default_factory=SamplingSettings)

    def check(self) -> None:
        self.require(self.group_size >= 2, "group_size", "must be at least 2 (responses are ranked against each other)")


@LOOPS.register("preference", PreferenceSettings)
class PreferenceLoop(Loop):
    """Offline: the task's responses, best first (a pair, or a ranked list)."""

    def __init__(self, run, model, reference_source: str):
        super().__init__(run)
        cfg, algo = run.cfg, self.settings
        self.algo, self.reference_source = algo, reference_source
        self.loss_fn = PREFERENCE_LOSSES.get(algo.preference_loss.name)
        self.supervised = getattr(self.loss_fn, "supervised", False)
        self.engine = make_engine(
            run,
            model,
            optim=self.optim(),
            batch_size_global=cfg.trainer.prompts_per_step_global,
            total_steps=cfg.trainer.max_steps,
        )
        self.reference = reference_policy(run, reference_source, self.engine)
        if getattr(algo, "reference", "model") == "precomputed":
            self.precompute_reference()
            self.reference = None

    def response_sets(self, rows: list[dict], timer) -> tuple[list[list[str]], list[list[float]], dict, list[dict]]:
        """(responses per prompt best first, their scores, metrics, sample rows)."""
        return [r["responses"] for r in rows], [r["scores"] for r in rows], {}, []

    def step(self, step: int, timer):
        run, algo = self.run, self.algo
        rows = self.next_rows(run.cfg.trainer.prompts_per_step_global)
        responses, scores, metrics, samples = self.response_sets(rows, timer)
        with timer.phase("log_probs"):
            batch, mask = encode_response_sets(run.tokenizer, run.prompts(rows), responses, self.engine.device)
            n = mask.shape[1]
            scores = pad_rows(scores, n, mask.device)
            ref = None
            if algo.preference_loss.name not in REFERENCE_FREE:
                ref = self.reference_log_probs(rows, batch, n)
        num_sets = all_reduce_sum(float(mask.any(-1).sum()))
        sums: dict[str, float] = {}

        def loss_fn(index):
            rows_index = (index[:, None] * n + torch.arange(n)).flatten()
            log_probs, lengths = sequence_log_probs(self.engine, {k: v[rows_index] for k, v in batch.items()})
            responses_set = ResponseSet(
                log_probs.view(-1, n),
                None if ref is None else ref[index],
                lengths.view(-1, n),
                scores[index],
                mask[index],
            )
            loss, stats = self.loss_fn(responses_set, algo.preference_loss)
            weight = float(responses_set.present.sum())
            for key, value in {
                **pair_statistics(responses_set, implicit_reward_beta(algo.preference_loss)),
                **stats,
                "loss": loss.detach().sum() / max(weight, 1),
            }.items():
                sums[f"pref/{key}"] = sums.get(f"pref/{key}", 0.0) + float(value) * weight
            return loss.sum() / max(num_sets, 1)

        with timer.phase("update"):
            grad_norm = optimizer_step(
                self.engine, split_micro_batches(len(rows), self.engine.gradient_accumulation_steps()), loss_fn
            )
        self.sync_rollout(timer)
        metrics.update({key: all_reduce_sum(value) / max(num_sets, 1) for key, value in sorted(sums.items())})
        metrics.update(
            {
                "actor/grad_norm": grad_norm,
                "actor/lr": self.engine.get_lr()[0],
                "tokens": all_reduce_sum(float(batch["attention_mask"].sum())),
            }
        )
        return metrics, samples

    def reference_log_probs(self, rows: list[dict], batch, n: int) -> torch.Tensor:
        if self.reference is None:  # precomputed
            return pad_rows([r["ref_log_probs"] for r in rows], n, batch["input_ids"].device)
        return score_response_sets(self.reference, batch, n, self.run.cfg.trainer.micro_batch_per_device)

    def precompute_reference(self) -> None:
        """Reference log-probs of every training response and of the held-out pairs that
        are evaluated, computed once; rows then carry them as ``ref_log_probs``."""
        run = self.run
        num_eval = (
            len(run.test_rows)
            if run.cfg.eval.num_examples is None
            else min(run.cfg.eval.num_examples, len(run.test_rows))
        )
        run.test_rows = run.test_rows.select(range(num_eval))
        for name in ("train_rows", "test_rows"):
            rows = getattr(run, name)
            values = []
            chunk = run.cfg.trainer.micro_batch_per_device
            for start in range(0, len(rows), chunk):
                part = rows.select(range(start, min(start + chunk, len(rows))))
                batch, mask = encode_response_sets(
                    run.tokenizer, run.prompts(list(part)), part["responses"], self.engine.device
                )
                log_probs = score_response_sets(self.reference, batch, mask.shape[1], chunk)
                values += [row[: len(r)] for row, r in zip(log_probs.tolist(), part["responses"])]
            setattr(run, name, rows.add_column("ref_log_probs", values))


@LOOPS.register("online_preference", OnlinePreferenceSettings)
class OnlinePreferenceLoop(PreferenceLoop):
    """Online: ``algo.group_size`` responses per prompt sampled from the current policy,
    scored by the reward, and turned into a training set by ``algo.selection``."""

    def __init__(self, run, model, reference_source: str):
        super().__init__(run, model, reference_source)
        self.select = RESPONSE_SELECTIONS.get(self.algo.selection.name)
        self.rollout = build_rollout(run, self.engine.module, self.algo.sampling)

    def response_sets(self, rows: list[dict], timer):
        run, algo, k = self.run, self.algo, self.algo.group_size
        prompts = run.prompts(rows)
        with timer.phase("rollout"):
            rollout = self.rollout.sample(run.encode(prompts), num_samples=k, max_new_tokens=run.max_new_tokens)
        with timer.phase("reward"):
            completions, totals, _ = run.score(repeat(rows, k), repeat(prompts, k), rollout.completion_ids())
            scores = torch.tensor(totals, dtype=torch.float32).view(len(rows), k)
            index, mask = self.select(scores, algo.selection)
        responses = [
            [completions[b * k + j] for j, keep in zip(index[b].tolist(), mask[b].tolist()) if keep]
            for b in range(len(rows))
        ]
        kept_scores = [
            [float(scores[b, j]) for j, keep in zip(index[b].tolist(), mask[b].tolist()) if keep]
            for b in range(len(rows))
        ]
        metrics = {
            "reward/mean": mean_std(totals)[0],
            "reward/std": mean_std(totals)[1],
            "selection/prompts_kept_frac": float(mask.any(-1).float().mean()),
            "selection/responses_kept": float(mask.sum(-1).float().mean()),
        }
        samples = [
            {"prompt": p, "completion": c, "reward": r, "answer": ""}
            for p, c, r in zip(repeat(prompts, k), completions, totals)
        ]
        return responses, kept_scores, metrics, samples


def pair_statistics(responses: ResponseSet, beta: float) -> dict[str, float]:
    """Sums over prompts of the best-vs-worst statistics: implicit-reward accuracy and
    margin beta * h, and the best / worst responses' summed log-probs."""
    with torch.no_grad():
        present = responses.present
        h = responses.pair_margin()
        chosen, rejected = responses.chosen_rejected()
        total = float(present.sum())
        per = lambda v: float((v * present).sum()) / max(total, 1)  # noqa: E731
        return {
            "accuracy": per(pair_accuracy(h)),
            "margin": per(beta * h),
            "chosen_logp": per(responses.log_probs.gather(1, chosen[:, None])[:, 0]),
            "rejected_logp": per(responses.log_probs.gather(1, rejected[:, None])[:, 0]),
        }
