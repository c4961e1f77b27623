"""Held-out evaluation on preference pairs, the evaluation of preference tasks.

accuracy: the fraction of held-out pairs ranked right (a tie counts 1/2). A reward model (a loop with
    ``pair_rewards``) ranks by its score; a policy by its implicit reward
    beta * (log pi(y|x) - log pi_ref(y|x)) (DPO, Rafailov et al. 2023, Sec. 5).
reward_margin: mean reward(chosen) - reward(rejected); chosen_reward / rejected_reward their means.
chosen_logp / rejected_logp: mean summed log-probs of the responses under the policy.
kl_to_reference: mean of sum_t log pi - log pi_ref over one response per held-out prompt
    sampled from the policy: an unbiased estimate of the sequence-level KL(pi || pi_ref).
    Absent when the reference log-probs were precomputed (no reference model is kept).
The reference is the loop's (the start model), else the start model loaded once.
"""

from __future__ import annotations

import torch

from rlkit.algos.preference_losses import implicit_reward_beta, pair_accuracy
from rlkit.engine import all_gather_objects, rank, world_size
from rlkit.metrics import mean_std
from rlkit.models.lora import BaseModelView, has_lora
from rlkit.models.sequences import encode_response_sets, score_response_sets
from rlkit.rollout import generate, token_log_probs
from rlkit.run import base_model_dir, load_frozen

_REFERENCES: dict[str, torch.nn.Module] = {}  # start models loaded for loops that keep none (e.g. sft), by source


def evaluate_pairs(run, loop) -> dict:
    """Evaluate on the first ``eval.num_examples`` held-out pairs, sharded over processes,
    with its own seeded generator state (like :func:`rlkit.evaluate.evaluate`)."""
    cfg = run.cfg.eval
    count = len(run.test_rows) if cfg.num_examples is None else min(cfg.num_examples, len(run.test_rows))
    indices = list(range(rank(), count, world_size()))
    score = loop.pair_rewards if hasattr(loop, "pair_rewards") else PolicyPairScorer(run, loop)
    records = []
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(run.cfg.seed * 7919 + rank())
        for start in range(0, len(indices), cfg.batch_size_per_device):
            batch = indices[start : start + cfg.batch_size_per_device]
            rows = [run.test_rows[i] for i in batch]
            scored = score(rows)
            records += [
                {
                    "index": i,
                    "prompt": p,
                    "chosen": row["chosen"],
                    "rejected": row["rejected"],
                    **{k: v[j] for k, v in scored.items()},
                }
                for j, (i, p, row) in enumerate(zip(batch, run.prompts(rows), rows))
            ]
    records = sorted((r for part in all_gather_objects(records) for r in part), key=lambda r: r["index"])
    return summarize_pairs(records, cfg.num_samples_in_report)


class PolicyPairScorer:
    """Implicit rewards, log-probs and a sampled KL estimate of a policy against its reference."""

    def __init__(self, run, loop):
        self.run, self.model = run, loop.engine.module
        self.beta = implicit_reward_beta(getattr(run.algo, "preference_loss", None))
        self.reference = getattr(loop, "reference", None)
        if self.reference is None and "ref_log_probs" not in run.test_rows.column_names:
            source = getattr(loop, "reference_source", None) or base_model_dir(run)
            if has_lora(loop.engine):
                self.reference = BaseModelView(loop.engine)
            else:
                if source not in _REFERENCES:
                    _REFERENCES[source] = load_frozen(run, source, next(self.model.parameters()).device)
                self.reference = _REFERENCES[source]

    @torch.no_grad()
    def __call__(self, rows: list[dict]) -> dict[str, list[float]]:
        run, micro = self.run, self.run.cfg.trainer.micro_batch_per_device
        prompts = run.prompts(rows)
        batch, _ = encode_response_sets(
            run.tokenizer, prompts, [[r["chosen"], r["rejected"]] for r in rows], next(self.model.parameters()).device
        )
        log_probs = score_response_sets(self.model, batch, 2, micro)
        if self.reference is None:
            ref = torch.tensor([[r["ref_log_probs"][0], r["ref_log_probs"][-1]] for r in rows], device=log_probs.device)
        else:
            ref = score_response_sets(self.reference, batch, 2, micro)
        rewards = self.beta * (log_probs - ref)
        out = {
            "chosen_reward": rewards[:, 0].tolist(),
            "rejected_reward": rewards[:, 1].tolist(),
            "chosen_logp": log_probs[:, 0].tolist(),
            "rejected_logp": log_probs[:, 1].tolist(),
        }
        if self.reference is not None:
            out["kl_to_reference"] = self.sampled_kl(prompts)
        return out

    def sampled_kl(self, prompts: list[str]) -> list[float]:
        rollout = generate(
            self.model,
            self.run.tokenizer,
            prompts,
            num_samples=1,
            max_new_tokens=self.run.max_new_tokens,
        )
        width = rollout.response_ids.shape[1]
        log_ratio = (
            token_log_probs(self.model, rollout.sequences, rollout.attention_mask, width)[0]
            - token_log_probs(self.reference, rollout.sequences, rollout.attention_mask, width)[0]
        )
        return (log_ratio * rollout.response_mask).sum(-1).tolist()


def summarize_pairs(records: list[dict], num_samples: int) -> dict:
    margins = [r["chosen_reward"] - r["rejected_reward"] for r in records]
    summary = {
        "num_examples": len(records),
        "accuracy": float(pair_accuracy(torch.tensor(margins)).mean()) if margins else 0.0,
        "reward_margin": mean_std(margins)[0],
        "reward_margin_std": mean_std(margins)[1],
    }
    for key in ("chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp", "kl_to_reference"):
        if records and key in records[0]:
            summary[key] = mean_std([r[key] for r in records])[0]
    summary["samples"] = [
        {
            "prompt": r["prompt"],
            "completion": r["chosen"],
            "answer": f"rejected: {r['rejected']}",
            "correct": m > 0,
            "reward": m,
        }
        for r, m in zip(records[:num_samples], margins)
    ]
    return summary
