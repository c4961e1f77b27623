"""The run report: ``report.json``, ``report.md`` and PNG plots in the run dir."""

from __future__ import annotations

import json
import logging
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlkit import atomic  # noqa: E402

log = logging.getLogger(__name__)

HEADLINE_KEYS = (
    "accuracy",
    "pass@1",
    "reward_mean",
    "response_length_mean",
    "truncated_frac",
    "reward_margin",
    "chosen_logp",
    "rejected_logp",
    "kl_to_reference",
)  # the last four: preference tasks


class Report:
    def __init__(self, run_dir: str, summary: dict):
        self.run_dir = run_dir
        self.summary = summary
        self.evaluations: list[dict] = []
        path = os.path.join(run_dir, "report.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    self.evaluations = json.load(f)["evaluations"]
            except (ValueError, KeyError, TypeError) as error:  # rlkit writes it atomically: damaged by something else
                log.warning("%s is unreadable (%s); its earlier evaluations are dropped from the report", path, error)

    def truncate_after(self, step: int) -> None:
        """Forget evaluations a resumed run will redo."""
        self.evaluations = [e for e in self.evaluations if e["step"] <= step]

    def add(self, step: int, label: str, evaluation: dict) -> None:
        self.evaluations = [e for e in self.evaluations if e["step"] != step] + [
            {"step": step, "label": label, **evaluation}
        ]
        self.evaluations.sort(key=lambda e: e["step"])

    def write(self) -> None:
        """report.json, the plots and report.md, each replaced atomically."""
        atomic.write_json(os.path.join(self.run_dir, "report.json"), {**self.summary, "evaluations": self.evaluations})
        plots = write_plots(self.run_dir, self.evaluations)
        atomic.write_text(
            os.path.join(self.run_dir, "report.md"), render_markdown(self.summary, self.evaluations, plots)
        )


def metric_records(path: str) -> list[tuple[bytes, dict]]:
    """(line, record) of each readable ``metrics.jsonl`` line; a line cut short by a kill, or
    otherwise not a JSON object, is left out."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # JSON or UTF-8
                continue
            if isinstance(record, dict) and isinstance(record.get("step", 0), int):
                records.append((line if line.endswith(b"\n") else line + b"\n", record))
    return records


def read_metrics(run_dir: str) -> list[dict]:
    return [record for _, record in metric_records(os.path.join(run_dir, "metrics.jsonl"))]


def truncate_metrics(run_dir: str, step: int) -> None:
    """Drop ``metrics.jsonl`` records after ``step`` (and any line cut short by a
    kill), so a resumed run logs each step once. The file is replaced atomically."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    kept = [line for line, record in metric_records(path) if record.get("step", 0) <= step]
    with atomic.atomic_open(path, "wb") as f:
        f.writelines(kept)


def write_plots(run_dir: str, evaluations: list[dict]) -> list[str]:
    """reward.png (training reward per step, eval reward) and accuracy.png (held-out accuracy, pass@k)."""
    train = [m for m in read_metrics(run_dir) if "reward/mean" in m]
    written = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        steps, rewards = [m["step"] for m in train], [m["reward/mean"] for m in train]
        ax.plot(steps, rewards, label="train reward (batch mean)", alpha=0.35)
        window = max(1, len(rewards) // 20)
        smoothed = [
            sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
            for i in range(len(rewards))
        ]
        ax.plot(steps, smoothed, label=f"train reward ({window}-step mean)")
    if evaluations and "reward_mean" in evaluations[0]:
        ax.plot(
            [e["step"] for e in evaluations],
            [e["reward_mean"] for e in evaluations],
            "o-",
            label="held-out reward (greedy)",
        )
    _finish(ax, fig, "reward", os.path.join(run_dir, "reward.png"))
    written.append("reward.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in [k for k in (evaluations[0] if evaluations else {}) if k == "accuracy" or k.startswith("pass@")]:
        label = {"accuracy": "accuracy (greedy)"}.get(key, f"{key} (sampled)")
        ax.plot([e["step"] for e in evaluations], [e[key] for e in evaluations], "o-", label=label)
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, fig, "held-out accuracy", os.path.join(run_dir, "accuracy.png"))
    written.append("accuracy.png")
    return written


def _finish(ax, fig, ylabel: str, path: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def render_markdown(summary: dict, evaluations: list[dict], plots: list[str]) -> str:
    lines = [f"# {summary.get('run_name', 'rlkit run')}", ""]
    lines += [
        f"- **{key}**: {value}"
        for key, value in summary.items()
        if key not in ("run_name",) and not isinstance(value, (dict, list))
    ]
    if evaluations:
        first, last = evaluations[0], evaluations[-1]
        lines += [
            "",
            f"**Held-out accuracy: {first['accuracy']:.3f} ({first['label']}) -> {last['accuracy']:.3f} "
            f"({last['label']}).**",
        ]
        keys = [
            k
            for k in evaluations[0]
            if k in HEADLINE_KEYS or k.startswith(("pass@", "maj@")) or k in evaluations[0].get("task_metrics", ())
        ]
        lines += [
            "",
            "## Evaluations",
            "",
            "| step | when | " + " | ".join(keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        lines += [
            f"| {e['step']} | {e['label']} | " + " | ".join(f"{e.get(k, float('nan')):.3f}" for k in keys) + " |"
            for e in evaluations
        ]
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
        lines += sample_lines(last)
    return "\n".join(lines) + "\n"


def sample_lines(evaluation: dict) -> list[str]:
    """The evaluation's greedy samples: one line per completion, or an environment task's
    episodes turn by turn (samples with a ``transcript``)."""
    samples = evaluation.get("samples", [])
    if samples and "transcript" in samples[0]:
        lines = ["", f"## Sample episodes ({evaluation['label']}, greedy)", ""]
        for sample in samples:
            lines += [sample["transcript"], ""]
        return lines
    lines = ["", f"## Sample completions ({evaluation['label']}, greedy)", ""]
    for sample in samples:
        mark = "correct" if sample["correct"] else "wrong"
        lines += [
            f"- prompt: `{_inline(sample['prompt'])}` -> `{_inline(sample['completion'])}` (answer "
            f"{sample['answer']}, {mark})"
        ]
    return lines


def _inline(text: str, limit: int = 300) -> str:
    text = text.replace("`", "'").replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + "..."
