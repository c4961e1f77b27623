"""Held-out evaluation: greedy accuracy, sampled pass@k, reward statistics and samples."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from rlkit.engine import all_gather_objects, is_main_process, is_sharded, rank, world_size
from rlkit.metrics import majority_correct, mean_std, pass_at_k
from rlkit.rollout import generate
from rlkit.rollout.generate import decode_responses


def evaluate_generation(run, loop) -> dict:
    """:func:`evaluate_model` on the loop's policy, at the rollout's response length."""
    return evaluate_model(run, loop.engine.module, run.max_new_tokens)


def evaluate_model(run, model, max_new_tokens: int) -> dict:
    """Evaluate ``model`` on the first ``eval.num_examples`` test rows, sharded over processes.

    accuracy: greedy decoding, the fraction the task's verifier marks correct (pass@1, greedy).
    pass@k: k samples at ``eval.temperature``, unbiased estimator; pass@1 from the same samples.
    Sampling uses its own seeded generator state, so an evaluation is reproducible and
    never shifts the training run's random stream (a resumed run matches an uninterrupted one).
    """
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(run.cfg.seed * 7919 + rank())
        return _evaluate(run, model, max_new_tokens)


def _evaluate(run, model, max_new_tokens: int) -> dict:
    cfg = run.cfg.eval
    count = len(run.test_rows) if cfg.num_examples is None else min(cfg.num_examples, len(run.test_rows))
    indices = list(range(rank(), count, world_size()))
    # ZeRO-3 ranks generate together: each runs as many batches, padded with row 0 (dropped after)
    padded = indices + [0] * ((-(-count // world_size()) - len(indices)) if is_sharded(model) else 0)
    records = []
    starts = range(0, len(padded), cfg.batch_size_per_device)
    show = is_main_process() and run.cfg.logger.progress_bar and len(starts) > 1
    for start in tqdm(starts, desc="evaluate", leave=False, disable=not show):
        batch = padded[start : start + cfg.batch_size_per_device]
        records += _evaluate_rows(run, model, batch, max_new_tokens)
    records = sorted(
        (r for part in all_gather_objects(records[: len(indices)]) for r in part), key=lambda r: r["index"]
    )
    summary = summarize(records, cfg.pass_k, cfg.num_samples_in_report)
    task_metrics = run.task.metrics([r["completion"] for r in records], [run.test_rows[r["index"]] for r in records])
    summary.update(task_metrics, task_metrics=sorted(task_metrics))
    failures = all_gather_objects(run.reward.pop_failures())
    summary.update({f"reward/{name}/failures": sum(part[name] for part in failures) for name in failures[0]})
    return summary


def _evaluate_rows(run, model, indices: list[int], max_new_tokens: int) -> list[dict]:
    cfg, tokenizer = run.cfg.eval, run.tokenizer
    rows = [run.test_rows[i] for i in indices]
    prompts = run.prompts(rows)
    greedy = generate(model, tokenizer, prompts, num_samples=1, max_new_tokens=max_new_tokens, greedy=True)
    completions = decode_responses(tokenizer, greedy)
    correct = run.verifier(prompts, completions, **run.columns(rows))
    rewards, _ = run.reward(prompts, completions, completion_ids=greedy.completion_ids(), **run.columns(rows))
    sampled_correct, sampled_answers = [[] for _ in rows], [[] for _ in rows]
    if cfg.pass_k:
        sampled = generate(
            model,
            tokenizer,
            prompts,
            num_samples=cfg.pass_k,
            max_new_tokens=max_new_tokens,
            temperature=cfg.temperature,
        )
        repeated = [row for row in rows for _ in range(cfg.pass_k)]
        sampled_texts = decode_responses(tokenizer, sampled)
        verdicts = run.verifier([p for p in prompts for _ in range(cfg.pass_k)], sampled_texts, **run.columns(repeated))
        sampled_correct = [verdicts[i * cfg.pass_k : (i + 1) * cfg.pass_k] for i in range(len(rows))]
        answers = [run.task.answer_key(c) for c in sampled_texts]
        sampled_answers = [answers[i * cfg.pass_k : (i + 1) * cfg.pass_k] for i in range(len(rows))]
    return [
        {
            "index": i,
            "prompt": p,
            "completion": c,
            "answer": str(row.get("answer", "")),
            "correct": float(ok) >= 1.0,
            "reward": r,
            "length": int(n),
            "truncated": bool(t),
            "samples_correct": [float(s) >= 1.0 for s in sc],
            "samples_answers": sa,
        }
        for i, row, p, c, ok, r, n, t, sc, sa in zip(
            indices,
            rows,
            prompts,
            completions,
            correct,
            rewards,
            greedy.response_lengths.tolist(),
            greedy.truncated.tolist(),
            sampled_correct,
            sampled_answers,
        )
    ]


def summarize(records: list[dict], k: int, num_samples: int) -> dict:
    rewards = [r["reward"] for r in records]
    summary = {
        "num_examples": len(records),
        "accuracy": mean_std([float(r["correct"]) for r in records])[0],
        "reward_mean": mean_std(rewards)[0],
        "reward_std": mean_std(rewards)[1],
        "response_length_mean": mean_std([float(r["length"]) for r in records])[0],
        "truncated_frac": mean_std([float(r["truncated"]) for r in records])[0],
    }
    if k:
        summary["pass@1"] = mean_std([pass_at_k(k, sum(r["samples_correct"]), 1) for r in records])[0]
        summary[f"pass@{k}"] = mean_std([pass_at_k(k, sum(r["samples_correct"]), k) for r in records])[0]
        if any(a is not None for r in records for a in r["samples_answers"]):
            summary[f"maj@{k}"] = mean_std(
                [float(majority_correct(r["samples_answers"], r["samples_correct"])) for r in records]
            )[0]
    summary["samples"] = [
        {key: r[key] for key in ("prompt", "completion", "answer", "correct", "reward")} for r in records[:num_samples]
    ]
    return summary
