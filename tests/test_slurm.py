"""On a real SLURM cluster (one node on localhost, started by scripts/slurm/local_cluster.sh):
a submitit multirun, and a job preempted by its signal and then requeued, resuming each time.

Needs root (it installs Slurm with apt-get and starts its daemons); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, cli_env, complete_checkpoints, fast_overrides, read_json, rlkit, train_records

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root: scripts/slurm/local_cluster.sh installs Slurm and starts its daemons")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason='the SLURM launcher needs pip install -e ".[slurm]"'
    )
    script = str(REPO / "scripts/slurm/local_cluster.sh")
    already_up = shutil.which("scontrol") and subprocess.run(
        ["scontrol", "ping"], capture_output=True, text=True
    ).stdout.count("is UP")
    done = subprocess.run(["bash", script, "up"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"local SLURM cluster did not start:\n{(done.stdout + done.stderr)[-3000:]}"
    yield
    if not already_up:
        subprocess.run(["bash", script, "down"], capture_output=True, timeout=300)


def wait_for(condition, seconds: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.is_file() else ""
            pytest.fail(f"no {what} within {seconds:.0f} s\n{tail}")
        time.sleep(0.2)


def job_state(job: str) -> str:
    squeue = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    if squeue:
        return squeue
    return subprocess.run(
        ["sacct", "-n", "-X", "-j", job, "-o", "State"], capture_output=True, text=True
    ).stdout.strip()


def test_submitit_multirun_runs_one_job_per_run(slurm_cluster, tmp_path: Path):
    args = fast_overrides(
        "trainer.max_steps=2",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "model.warmstart.steps=2",
        "eval.num_examples=8",
        "eval.pass_k=0",
    )
    rlkit(
        [
            "train",
            "--multirun",
            "hydra/launcher=slurm",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=10",
            "algo=grpo,rloo",
            *args,
        ],
        tmp_path,
        timeout=400,
    ).check()
    [sweep] = list((tmp_path / "outputs" / "multirun").iterdir())
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert sorted(read_json(run / "report.json")["algo"] for run in runs) == ["grpo", "rloo"]
    for run in runs:
        assert [e["step"] for e in read_json(run / "report.json")["evaluations"]] == [0, 2]
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if "_" in p.name and not p.name.startswith("."))
    assert len(tasks) == 2 and len({t.split("_")[0] for t in tasks}) == 1, tasks  # one job array, one task per run
    # submitit has the results once a job's function returns; SLURM may still show the job RUNNING while it exits
    wait_for(
        lambda: [job_state(task) for task in tasks] == ["COMPLETED", "COMPLETED"],
        60,
        "both array tasks COMPLETED in SLURM",
    )


# 2 processes (ZeRO-2) per job through the sbatch template; each step waits 0.4 s in the reward.
REQUEUE_ARGS = fast_overrides(
    "hardware=zero2",
    "hardware.device=cpu",
    "hardware.dtype=float32",
    "reward.fn=probe_rewards:paced_digit_share",
    "model.warmstart.steps=0",
    "trainer.max_steps=10",
    "trainer.save_every=4",
    "trainer.eval_every=0",
    "eval.num_examples=4",
    "eval.pass_k=0",
    "run_name=requeued",
)


def test_sbatch_job_preempted_then_requeued_resumes_and_finishes(slurm_cluster, tmp_path: Path):
    env = cli_env(PYTHONPATH=str(TESTS), NPROC_PER_NODE="2", RLKIT_TEST_PACE_S="0.4")
    job = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--cpus-per-task=2",
            f"--output={tmp_path}/slurm-%j.out",
            str(REPO / "scripts/slurm/train.sbatch"),
            *REQUEUE_ARGS,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    log, run_dir = tmp_path / f"slurm-{job}.out", tmp_path / "outputs" / "requeued"
    logged = lambda: [m["step"] for m in train_records(run_dir)] if (run_dir / "metrics.jsonl").is_file() else []  # noqa: E731
    try:
        # 1. SLURM's time-limit/preemption signal: checkpoint at the next step boundary, requeue, resume from it
        wait_for(lambda: 2 in logged(), 240, "step 2", log)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        wait_for(lambda: "rlkit: preempted after step" in log.read_text(), 60, "preemption checkpoint", log)
        preempted_at = int(log.read_text().split("rlkit: preempted after step ")[1].split(";")[0])
        assert preempted_at in complete_checkpoints(run_dir)
        run_id = read_json(run_dir / "checkpoints" / str(preempted_at) / "trainer_state.json")["run_id"]
        kept = [
            line
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= preempted_at
        ]
        # 2. a plain requeue (the job is killed): resume from the newest periodic checkpoint
        wait_for(
            lambda: "restart 1" in log.read_text() and max(logged()) > max(preempted_at, 4),
            240,
            "steps after the requeue",
            log,
        )
        subprocess.run(["scontrol", "requeue", job], check=True)
        wait_for(lambda: job_state(job) == "COMPLETED", 300, "completion of the requeued job", log)
    finally:
        subprocess.run(["scancel", job])
    text = log.read_text()
    assert "restart 2" in text and text.count("rlkit: preempted after step") == 1
    assert logged() == list(range(1, 11))  # each step once
    assert (run_dir / "metrics.jsonl").read_text().splitlines()[: len(kept)] == kept  # resumed, not restarted
    assert complete_checkpoints(run_dir)[-1] == 10
    assert read_json(run_dir / "checkpoints" / "10" / "trainer_state.json")["run_id"] == run_id
    assert [e["step"] for e in read_json(run_dir / "report.json")["evaluations"]] == [0, 10]
