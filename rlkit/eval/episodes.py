"""Held-out evaluation of an environment task: its test instances played turn by turn, greedily
(``accuracy``: the success rate) and sampled at ``eval.temperature`` (``pass@1``, ``pass@k`` over
``eval.pass_k`` episodes per instance), with what the episodes did: turns, tool calls and their
failure rate, invalid actions, environment errors, truncation. Sample episodes for the report,
turn by turn, and a table of whole episodes for W&B."""

from __future__ import annotations

import torch

from rlkit.engine import all_gather_objects, rank, world_size
from rlkit.envs.episodes import Episode, run_episodes
from rlkit.envs.sampling import backend_sample_fn
from rlkit.envs.stats import episode_metrics, episode_table, render_episode
from rlkit.loops.registry import SamplingSettings
from rlkit.metrics import mean_std, pass_at_k
from rlkit.rollout.backends import ROLLOUTS

# episode metrics shown in the report's table beside accuracy and pass@k
REPORTED = ("turns_mean", "tool_calls_per_episode", "tool_failure_rate", "invalid_actions_per_episode")


def evaluate_episodes(run, loop) -> dict:
    """:func:`evaluate_episodes_model` on the loop's policy."""
    return evaluate_episodes_model(run, loop.engine.module)


def evaluate_episodes_model(run, model) -> dict:
    """The first ``eval.num_examples`` held-out instances, sharded over processes. Sampling uses its
    own seeded generator state, so an evaluation never shifts the training run's random stream."""
    run.task.check_tokenizer(run.tokenizer)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(run.cfg.seed * 7919 + rank())
        cfg = run.cfg.eval
        count = len(run.test_rows) if cfg.num_examples is None else min(cfg.num_examples, len(run.test_rows))
        rows = [run.test_rows[i] for i in range(rank(), count, world_size())]
        greedy = play(run, model, rows, greedy=True)
        sampled = play(run, model, [row for row in rows for _ in range(cfg.pass_k)], greedy=False) if cfg.pass_k else []
    records = [record(run, e, sampled[i * cfg.pass_k : (i + 1) * cfg.pass_k]) for i, e in enumerate(greedy)]
    gathered = [r for part in all_gather_objects(records) for r in part]
    return summarize(gathered, cfg.pass_k, cfg.num_samples_in_report)


def play(run, model, rows: list[dict], greedy: bool) -> list[Episode]:
    """Episodes on ``rows`` in batches of ``eval.batch_size_per_device``, from rlkit's sampler on ``model``."""
    sampling = SamplingSettings(temperature=run.cfg.eval.temperature)
    backend = ROLLOUTS.get("hf")(ROLLOUTS.make_settings("hf"), model=model, tokenizer=run.tokenizer, sampling=sampling)
    sample_fn, settings, size = (
        backend_sample_fn(backend, greedy),
        run.task.episode_settings(),
        run.cfg.eval.batch_size_per_device,
    )
    episodes = []
    for start in range(0, len(rows), size):
        batch = rows[start : start + size]
        episodes += run_episodes(sample_fn, run.tokenizer, [run.task.make_env() for _ in batch], batch, settings)
    return episodes


def record(run, greedy: Episode, sampled: list[Episode]) -> dict:
    """What the summary needs of one instance: its greedy episode's metrics and text, and its samples' successes."""
    success = run.task.prototype.success
    return {
        "metrics": episode_metrics([greedy], [run.task.prototype]),
        "correct": success(greedy.total_reward),
        "reward": greedy.total_reward,
        "samples_correct": [success(e.total_reward) for e in sampled],
        "prompt": greedy.turns[0].observation if greedy.turns else "",
        "answer": str(greedy.row.get("answer", "")),
        "transcript": render_episode(greedy),
        "table_row": episode_table([greedy])[1][0],
    }


def summarize(records: list[dict], k: int, num_samples: int) -> dict:
    mean = lambda key: mean_std([float(r["metrics"][key]) for r in records])[0]  # noqa: E731
    rewards = [r["reward"] for r in records]
    summary = {
        "num_examples": len(records),
        "accuracy": mean_std([float(r["correct"]) for r in records])[0],
        "reward_mean": mean_std(rewards)[0],
        "reward_std": mean_std(rewards)[1],
        "response_length_mean": mean("env/reply_tokens_mean"),
        "truncated_frac": mean("env/truncated_turns_rate") + mean("env/truncated_tokens_rate"),
        "truncated_tokens_rate": mean("env/truncated_tokens_rate"),
        "error_rate": mean("env/error_rate"),
        "turns_mean": mean("env/turns_mean"),
        "tool_calls_per_episode": mean("env/tool_calls_per_episode"),
        "tool_failure_rate": failure_rate(records),
        "invalid_actions_per_episode": mean("env/invalid_actions_per_episode"),
    }
    if k:
        summary["pass@1"] = mean_std([pass_at_k(k, sum(r["samples_correct"]), 1) for r in records])[0]
        summary[f"pass@{k}"] = mean_std([pass_at_k(k, sum(r["samples_correct"]), k) for r in records])[0]
    summary["task_metrics"] = list(REPORTED)
    summary["samples"] = [
        {key: r[key] for key in ("prompt", "answer", "correct", "reward", "transcript")}
        | {"completion": r["transcript"]}
        for r in records[:num_samples]
    ]
    columns, _ = episode_table([])
    summary["tables"] = {"eval_episodes": (columns, [r["table_row"] for r in records[:num_samples]])}
    return summary


def failure_rate(records: list[dict]) -> float:
    """Failed tool calls over all tool calls of the greedy episodes (0 without calls)."""
    calls = sum(r["metrics"]["env/tool_calls_per_episode"] for r in records)
    failed = sum(r["metrics"]["env/tool_failure_rate"] * r["metrics"]["env/tool_calls_per_episode"] for r in records)
    return failed / calls if calls else 0.0
