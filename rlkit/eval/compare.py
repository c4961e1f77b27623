"""``rlkit compare DIR``: one table and one plot for a sweep of runs (RL4LMs/GRUE style).

Every run directory under DIR (any depth; a ``report.json`` marks one) is grouped by
its overrides (Hydra's record of them, else its run name, which shortens long ones to a hash)
less ``seed=N``, less those that do not change what is trained (logging, resuming, the run
directory) and less the overrides every run shares, so
``algo=grpo,seed=2,trainer.max_steps=50`` is labelled ``algo=grpo`` in a sweep over algorithms
and seeds; the seeds of one configuration are aggregated into mean ± std. Writes
``compare.md``, ``compare.json`` and ``compare.png`` into DIR.
"""

from __future__ import annotations

import json
import os
import statistics

from rlkit.eval.report import plt, read_metrics


def find_runs(sweep_dir: str) -> list[str]:
    return sorted(root for root, _, files in os.walk(sweep_dir) if "report.json" in files and "metrics.jsonl" in files)


def summarise_run(run_dir: str) -> dict:
    """The numbers of one run: accuracy before and after RL, wall time, throughput, memory, reward curve."""
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)
    metrics = read_metrics(run_dir)
    steps = [m for m in metrics if "reward/mean" in m]
    evaluations = report.get("evaluations", [])
    seconds = sum(m.get(key, 0.0) for m in metrics for key in ("time/step", "time/eval", "time/checkpoint"))
    return {
        "run_dir": run_dir,
        "algo": report.get("algo", "?"),
        "overrides": experiment_overrides(run_dir, report),
        "seed": report.get("seed"),
        "steps": len(steps),
        "complete": bool(evaluations) and evaluations[-1]["step"] >= report.get("max_steps", 0),
        "accuracy_start": evaluations[0]["accuracy"] if evaluations else float("nan"),
        "accuracy_final": evaluations[-1]["accuracy"] if evaluations else float("nan"),
        "accuracy_gain": evaluations[-1]["accuracy"] - evaluations[0]["accuracy"] if evaluations else float("nan"),
        "wall_seconds": seconds,
        "tokens_per_s": statistics.fmean(m["throughput/tokens_per_s"] for m in steps) if steps else float("nan"),
        "peak_rss_mb": report.get("peak_rss_mb", float("nan")),
        "peak_gpu_allocated_mb": report.get("peak_gpu_allocated_mb"),
        "reward_curve": [[m["step"], m["reward/mean"]] for m in steps],
    }


NOT_THE_EXPERIMENT = ("seed", "resume", "run_name", "logger.", "trainer.allow_nonempty_dir", "hydra.")


def experiment_overrides(run_dir: str, report: dict) -> list[str]:
    """The run's overrides that change what it trains, less its seed (those of ``.hydra/overrides.yaml``
    when Hydra wrote one, else those in its run name)."""
    recorded = os.path.join(run_dir, ".hydra", "overrides.yaml")
    if os.path.isfile(recorded):
        with open(recorded) as f:
            overrides = [line[2:].strip() for line in f if line.startswith("- ")]
    else:
        overrides = report.get("run_name", "").split(",")
    keep = lambda part: part and not part.lstrip("+~").startswith(NOT_THE_EXPERIMENT)  # noqa: E731
    return [part for part in overrides if keep(part)]


def label_runs(runs: list[dict]) -> None:
    """``label``: the run's overrides that not every run shares (its algo name if none)."""
    shared = set.intersection(*(set(r["overrides"]) for r in runs))
    for run in runs:
        run["label"] = ",".join(part for part in run["overrides"] if part not in shared) or run["algo"]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over seeds (std 0 for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[dict]) -> dict[str, dict]:
    by_algo: dict[str, list[dict]] = {}
    for run in runs:
        by_algo.setdefault(run["label"], []).append(run)
    table = {}
    for algo, group in sorted(by_algo.items()):
        row = {"seeds": sorted(r["seed"] for r in group), "steps": max(r["steps"] for r in group)}
        for key in ("accuracy_start", "accuracy_final", "accuracy_gain", "wall_seconds", "tokens_per_s", "peak_rss_mb"):
            row[key], row[key + "_std"] = mean_std([r[key] for r in group])
        gpu = [r["peak_gpu_allocated_mb"] for r in group if r["peak_gpu_allocated_mb"] is not None]
        row["peak_gpu_allocated_mb"] = max(gpu) if gpu else None
        table[algo] = row
    return table


def mean_curve(group: list[dict]) -> tuple[list[int], list[float]]:
    """Reward per step averaged over seeds (steps all seeds reached), smoothed over a window."""
    curves = [dict(r["reward_curve"]) for r in group]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    means = [statistics.fmean(c[s] for c in curves) for s in steps]
    window = max(1, len(means) // 15)
    smoothed = [statistics.fmean(means[max(0, i - window + 1) : i + 1]) for i in range(len(means))]
    return steps, smoothed


def plot(runs: list[dict], path: str) -> None:
    by_algo: dict[str, list[dict]] = {}
    for run in runs:
        by_algo.setdefault(run["label"], []).append(run)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 configurations
    for index, (algo, group) in enumerate(sorted(by_algo.items())):
        ax.plot(
            *mean_curve(group),
            label=f"{algo} ({len(group)} seeds)",
            color=colors[index % len(colors)],
            linestyle="-" if index < 20 else "--",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("train reward (batch mean, seed mean, smoothed)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the curves, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(table: dict[str, dict]) -> str:
    lines = [
        "| run | seeds | steps | held-out accuracy start | final (mean ± std) | gain over the run | wall time (s) "
        "| tokens/s | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for algo, row in sorted(table.items(), key=lambda item: -item[1]["accuracy_final"]):
        lines.append(
            f"| {algo} | {len(row['seeds'])} | {row['steps']} | {row['accuracy_start']:.3f} | "
            f"{row['accuracy_final']:.3f} ± {row['accuracy_final_std']:.3f} | "
            f"{row['accuracy_gain']:+.3f} ± {row['accuracy_gain_std']:.3f} | "
            f"{row['wall_seconds']:.0f} ± {row['wall_seconds_std']:.0f} | "
            f"{row['tokens_per_s']:.0f} | {row['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n\n![reward curves](compare.png)\n"


def compare(sweep_dir: str) -> dict[str, dict]:
    found = [summarise_run(d) for d in find_runs(sweep_dir)]
    runs = [r for r in found if r["complete"]]
    incomplete = [r["run_dir"] for r in found if not r["complete"]]
    if not runs:
        raise FileNotFoundError(
            "no complete runs (directories with report.json and metrics.jsonl, evaluated at their last step) "
            f"under {sweep_dir}"
        )
    label_runs(runs)
    table = aggregate(runs)
    with open(os.path.join(sweep_dir, "compare.json"), "w") as f:
        json.dump({"algorithms": table, "runs": runs, "incomplete_runs": incomplete}, f, indent=2)
    with open(os.path.join(sweep_dir, "compare.md"), "w") as f:
        skipped = f"Skipped {len(incomplete)} incomplete runs: {', '.join(incomplete)}\n\n" if incomplete else ""
        f.write(f"# Comparison of {len(runs)} runs under {sweep_dir}\n\n" + skipped + render_markdown(table))
    plot(runs, os.path.join(sweep_dir, "compare.png"))
    return table
