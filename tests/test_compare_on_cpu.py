"""``rlkit compare``: aggregation of a sweep's run directories, on synthetic runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlkit.eval.compare import compare
from rlkit.metrics import peak_memory


def fake_run(root: Path, algo: str, seed: int, final: float, rss: float, rewards: list[float]) -> None:
    run_dir = root / f"{algo}-seed{seed}"
    run_dir.mkdir(parents=True)
    report = {
        "run_name": f"algo={algo},seed={seed},trainer.max_steps=3",
        "algo": algo,
        "seed": seed,
        "peak_rss_mb": rss,
        "max_steps": 3,
        "evaluations": [{"step": 0, "accuracy": 0.5}, {"step": 3, "accuracy": final}],
    }
    (run_dir / "report.json").write_text(json.dumps(report))
    lines = [
        {"step": i + 1, "reward/mean": r, "time/step": 2.0, "throughput/tokens_per_s": 100.0 * (i + 1)}
        for i, r in enumerate(rewards)
    ]
    lines.append({"step": 3, "time/eval": 4.0})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_compare_aggregates_seeds_per_configuration(tmp_path):
    fake_run(tmp_path, "grpo", 1, 0.6, 700.0, [0.1, 0.2, 0.3])
    fake_run(tmp_path, "grpo", 2, 0.8, 720.0, [0.3, 0.4, 0.5])
    fake_run(tmp_path, "ppo", 1, 0.7, 900.0, [0.2, 0.2, 0.2])
    fake_run(tmp_path, "ppo", 2, 0.0, 900.0, [0.2])
    partial = json.loads((tmp_path / "ppo-seed2" / "report.json").read_text())
    partial["evaluations"] = partial["evaluations"][:1]  # still running: only the first evaluation so far
    (tmp_path / "ppo-seed2" / "report.json").write_text(json.dumps(partial))
    table = compare(str(tmp_path))
    assert set(table) == {
        "algo=grpo",
        "algo=ppo",
    }  # the shared trainer.max_steps=3 and the seeds are not part of the label
    grpo = table["algo=grpo"]
    assert grpo["seeds"] == [1, 2] and grpo["steps"] == 3
    assert grpo["accuracy_final"] == pytest.approx(0.7) and grpo["accuracy_final_std"] == pytest.approx(
        0.1414, abs=1e-4
    )
    assert grpo["wall_seconds"] == pytest.approx(3 * 2.0 + 4.0) and grpo["tokens_per_s"] == pytest.approx(200.0)
    assert grpo["peak_rss_mb"] == pytest.approx(710.0) and grpo["accuracy_gain"] == pytest.approx(0.2)
    assert table["algo=ppo"]["accuracy_final_std"] == 0.0 and table["algo=ppo"]["seeds"] == [
        1
    ]  # the incomplete seed 2 is skipped
    for name in ("compare.md", "compare.json", "compare.png"):
        assert (tmp_path / name).is_file()
    markdown = (tmp_path / "compare.md").read_text()
    assert markdown.index("algo=grpo") < markdown.index("algo=ppo")  # best final accuracy first
    assert "0.700 ± 0.141" in markdown and "Skipped 1 incomplete runs" in markdown


def test_compare_of_a_directory_without_runs_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete runs"):
        compare(str(tmp_path))


def test_peak_memory_reports_this_process():
    assert peak_memory()["peak_rss_mb"] > 10


def test_seeds_group_by_hydras_overrides_when_the_run_name_is_shortened(tmp_path):
    """A long run name ends in a hash that differs per seed; Hydra's overrides.yaml says what the run was,
    and what does not change the experiment (logging, the run directory check) does not split groups."""
    for seed, final in ((1, 0.6), (2, 0.8)):
        fake_run(tmp_path, "gigpo", seed, final, 700.0, [0.1, 0.2, 0.3])
        run_dir = tmp_path / f"gigpo-seed{seed}"
        report = json.loads((run_dir / "report.json").read_text())
        report["run_name"] = f"algo=gigpo,env.test_size=50,model.warmstart.batch_size_global=-{seed}f3e1a2b"
        (run_dir / "report.json").write_text(json.dumps(report))
        (run_dir / ".hydra").mkdir()
        overrides = [
            "algo=gigpo",
            f"seed={seed}",
            "task=maze",
            "logger.mode=disabled",
            "trainer.allow_nonempty_dir=true",
        ]
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    table = compare(str(tmp_path))
    assert list(table) == ["gigpo"]  # one configuration, its two seeds: labelled by its algo (every override shared)
    assert table["gigpo"]["seeds"] == [1, 2] and table["gigpo"]["accuracy_final"] == pytest.approx(0.7)
