"""End to end: `rlkit train` on the SQL and HumanEval tasks with the tiny model, checking
that per-term rewards, failure counts and the task's evaluation metrics are logged."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import fast_overrides, read_json, read_metrics, rlkit

pytestmark = pytest.mark.slow

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared/data/humaneval/HumanEval.jsonl.gz"
ARITH_ONLY = ("task.options.train_size", "task.options.test_size")


def test_sql_task_trains_and_reports(tmp_path: Path):
    args = fast_overrides(
        "task=sql", "task.options.train_size=200", "task.options.test_size=16", "task.max_new_tokens=32", "run_name=sql"
    )
    rlkit(["train", *args], tmp_path).check()
    run_dir = tmp_path / "outputs" / "sql"
    steps = [m for m in read_metrics(run_dir) if "reward/mean" in m]
    assert len(steps) == 4
    assert all("reward/execution/mean" in m and m["reward/execution/failures"] == 0.0 for m in steps)
    final = read_json(run_dir / "report.json")["evaluations"][-1]
    assert {"accuracy", "pass@1", "pass@2", "reward_mean", "reward/execution/failures"} <= set(final)
    assert "SELECT" in final["samples"][0]["answer"]


@pytest.mark.skipif(not HUMANEVAL.is_file(), reason=f"HumanEval not found at {HUMANEVAL}")
def test_humaneval_task_runs_completions_in_the_sandbox(tmp_path: Path):
    from rlkit.rewards.sandbox import SandboxUnavailable, check_sandbox

    try:
        check_sandbox()
    except SandboxUnavailable as error:  # as tests/test_sandbox.py: nothing runs unsandboxed
        pytest.skip(f"no sandbox: {error}")
    args = fast_overrides(
        "task=humaneval",
        f"task.path={HUMANEVAL}",
        "task.max_new_tokens=32",
        "eval.num_examples=8",
        "trainer.max_steps=2",
        "model.warmstart.steps=0",
        "model.tiny.max_position_embeddings=1024",  # prompts are long: no SFT on them
        "run_name=humaneval",
        drop=ARITH_ONLY,
    )
    rlkit(["train", *args], tmp_path).check()
    run_dir = tmp_path / "outputs" / "humaneval"
    steps = [m for m in read_metrics(run_dir) if "reward/mean" in m]
    assert len(steps) == 2 and all(m["reward/tests/failures"] == 0.0 for m in steps)
    final = read_json(run_dir / "report.json")["evaluations"][-1]
    assert final["num_examples"] == 8 and {"pass@1", "pass@2"} <= set(final)
    assert "pass@2" in (run_dir / "report.md").read_text()
