"""End to end: a run survives kills inside every write, damaged checkpoints, signals, non-finite
rewards and losses, bad directories and bad configs, and says what happened in one line.

Kills land inside a write deterministically through the ``RLKIT_TEST_KILL_AT`` hook of
:mod:`rlkit.atomic` (SIGKILL just before the rename that publishes a file or directory).
Every resumed run is compared bit for bit with one uninterrupted reference run.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    CliResult,
    cli_env,
    complete_checkpoints,
    fast_overrides,
    read_json,
    rlkit,
    rlkit_executable,
    train_records,
)

pytestmark = pytest.mark.slow

# 4 steps, evaluation and a checkpoint every 2, every checkpoint kept (the corruption tests need 2 and 4).
ARGS = [
    "train",
    *fast_overrides("trainer.max_steps=4", "algo.optim.schedule=linear", "trainer.keep_checkpoints=0", "run_name=r"),
]


def is_timing(key: str) -> bool:
    return key.startswith(("time/", "throughput/"))


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in records]


def load_weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def assert_matches_reference(run_dir: Path, reference: Path) -> None:
    """Each step logged once with the reference's numbers, the same evaluations, bit-identical final weights."""
    import torch

    assert [m["step"] for m in train_records(run_dir)] == [1, 2, 3, 4]
    assert without_timings(train_records(run_dir)) == without_timings(train_records(reference))
    evaluations = lambda d: [(e["step"], e["accuracy"]) for e in read_json(d / "report.json")["evaluations"]]  # noqa: E731
    assert evaluations(run_dir) == evaluations(reference)
    got, want = load_weights(run_dir / "checkpoints" / "4"), load_weights(reference / "checkpoints" / "4")
    assert [name for name in want if not torch.equal(got[name], want[name])] == []


def assert_one_line_error(result: CliResult, *expected: str, code: int | None = None) -> None:
    """Non-zero exit (``code`` if given), no traceback, one ``rlkit: error:`` line naming the problem."""
    assert result.returncode != 0 and (code is None or result.returncode == code), result.describe()
    assert "Traceback" not in result.stdout + result.stderr, result.describe()
    errors = [line for line in result.stderr.splitlines() if line.startswith("rlkit: error: ")]
    assert len(errors) == 1, result.describe()
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    cwd = tmp_path_factory.mktemp("reference")
    rlkit(ARGS, cwd).check()
    return cwd / "outputs" / "r"


def copy_run(reference: Path, cwd: Path) -> Path:
    run_dir = cwd / "outputs" / "r"
    shutil.copytree(reference, run_dir)
    return run_dir


# 1. kills inside each write: report, metrics truncation, checkpoint, warm start, initial model, run files

KILL_POINTS = [
    "rlkit_run.json",  # the run marker with the W&B id, first write of a run
    "initial_model",  # the tiny model's random init (directory)
    "warmstart",  # the warm-start model (directory)
    "report.json@1",  # the baseline evaluation's report
    "report.json@2",  # the step-2 report, before checkpoint 2
    "checkpoint",  # checkpoint 2 half written (DeepSpeed state only)
    "manifest.json",  # checkpoint 2 written but for its manifest
    "metrics.jsonl",  # the truncation of metrics.jsonl when resuming from checkpoint 2
    "4",  # checkpoint 4 complete, killed before its rename
]


def test_a_kill_inside_any_write_resumes_bit_identically(reference: Path, tmp_path: Path):
    run_dir = tmp_path / "outputs" / "r"
    for point in KILL_POINTS:
        killed = rlkit(ARGS, tmp_path, env=cli_env(RLKIT_TEST_KILL_AT=point))
        assert killed.returncode == -signal.SIGKILL, f"kill point {point}: {killed.describe()}"
        assert not (run_dir / "report.json").exists() or read_json(run_dir / "report.json")["evaluations"] is not None
    rlkit(ARGS, tmp_path).check()
    assert_matches_reference(run_dir, reference)
    assert complete_checkpoints(run_dir) == [2, 4]
    marker = read_json(run_dir / "rlkit_run.json")
    assert {
        checkpoint["run_id"] for checkpoint in map(read_json, run_dir.glob("checkpoints/*/trainer_state.json"))
    } == {marker["run_id"]}, "the W&B run id changed between segments"
    # one segment per start that got past writing the marker (the first kill landed inside that write)
    assert [s["from_step"] for s in marker["segments"]][-1] == 2 and len(marker["segments"]) == len(KILL_POINTS)


# 2. damaged checkpoints: each file of the newest one cut short, overwritten with random bytes or deleted

DAMAGES = ("truncate", "random bytes", "delete")


def damage(file: Path, how: str) -> None:
    import random

    data = file.read_bytes()
    if how == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif how == "random bytes":
        rng = random.Random(len(data))
        start = len(data) // 2
        patch = bytes(b ^ rng.randrange(1, 256) for b in data[start : start + 8])  # every byte changes
        file.write_bytes(data[:start] + patch + data[start + 8 :])
    else:
        file.unlink()


def test_every_damage_to_every_checkpoint_file_is_found_and_skipped(reference: Path, tmp_path: Path, caplog):
    from rlkit.checkpoint import newest_intact_checkpoint

    files = sorted(
        p.relative_to(reference / "checkpoints" / "4")
        for p in (reference / "checkpoints" / "4").rglob("*")
        if p.is_file()
    )
    assert {"manifest.json", "model.safetensors", "trainer_state.json", "rng_rank0.pt"} <= {str(f) for f in files}
    assert any(str(f).startswith("training_state/") for f in files)
    for index, (file, how) in enumerate((f, h) for f in files for h in DAMAGES):
        run_dir = tmp_path / str(index)
        shutil.copytree(reference / "checkpoints", run_dir / "checkpoints")
        damage(run_dir / "checkpoints" / "4" / file, how)
        caplog.clear()
        assert newest_intact_checkpoint(str(run_dir)) == str(run_dir / "checkpoints" / "2"), (file, how)
        [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert "checkpoint" in warning and str(file.name) in warning and "damaged" in warning, (file, how, warning)
        assert (run_dir / "checkpoints" / "damaged-4").is_dir() and not (run_dir / "checkpoints" / "4").exists()


@pytest.mark.parametrize(
    "file, how",
    [
        ("training_state/state/mp_rank_00_model_states.pt", "random bytes"),  # used to load silently
        ("model.safetensors", "truncate"),
        ("training_state", "delete"),
    ],
)
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(
    reference: Path, tmp_path: Path, file: str, how: str
):
    run_dir = copy_run(reference, tmp_path)
    target = run_dir / "checkpoints" / "4" / file
    shutil.rmtree(target) if target.is_dir() else damage(target, how)
    result = rlkit(ARGS, tmp_path).check()
    output = result.stdout + result.stderr
    assert "checkpoint" in output and "is damaged" in output and "resuming from" in output, result.describe()
    assert "resumed from" in output and "at step 2 of 4" in output, result.describe()
    assert_matches_reference(run_dir, reference)


def test_no_intact_checkpoint_is_a_one_line_error(reference: Path, tmp_path: Path):
    run_dir = copy_run(reference, tmp_path)
    for step in ("2", "4"):
        damage(run_dir / "checkpoints" / step / "trainer_state.json", "truncate")
    result = rlkit(ARGS, tmp_path)
    assert_one_line_error(result, "no intact checkpoint", "trainer_state.json", "resume=never", code=1)
    assert complete_checkpoints(run_dir) == [2, 4], "nothing is moved when nothing is intact"


def test_a_checkpoint_without_manifest_from_an_older_rlkit_still_resumes(reference: Path, tmp_path: Path):
    """Older checkpoints have no manifest and no checkpoint_format: checked for completeness and
    loadability only, and resumed bit-identically."""
    run_dir = copy_run(reference, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "4")
    legacy = run_dir / "checkpoints" / "2"
    (legacy / "manifest.json").unlink()
    state = read_json(legacy / "trainer_state.json")
    del state["checkpoint_format"]
    (legacy / "trainer_state.json").write_text(json.dumps(state))
    rlkit(ARGS, tmp_path).check()
    assert_matches_reference(run_dir, reference)


# 3. signals: SIGTERM and SIGINT checkpoint at the next step boundary and stop; twice stops at once


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [rlkit_executable(), *args], cwd=cwd, env=cli_env(), stdout=out, stderr=subprocess.STDOUT
        )


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + 300
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and f'{{"step": {step}, "reward/mean"' in metrics.read_text()):
        assert process.poll() is None, (
            f"the run exited ({process.returncode}) before step {step}:\n{log.read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"no step {step} within 300 s"
        time.sleep(0.02)


def test_sigterm_checkpoints_at_the_next_step_and_resumes_bit_identically(reference: Path, tmp_path: Path):
    run_dir, log = tmp_path / "outputs" / "r", tmp_path / "run.log"
    process = start(ARGS, tmp_path, log)
    wait_for_step(process, run_dir, 1, log)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text, text
    assert "rlkit: SIGTERM received: saving a checkpoint at the end of this step" in text, text
    stopped = [line for line in text.splitlines() if line.startswith("rlkit: stopped by SIGTERM after step")]
    assert len(stopped) == 1 and "checkpoint saved" in stopped[0], text
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert 1 <= step < 4 and complete_checkpoints(run_dir)[-1] == step
    rlkit(ARGS, tmp_path).check()
    assert_matches_reference(run_dir, reference)


def test_a_second_sigint_stops_at_once_without_a_traceback(reference: Path, tmp_path: Path):
    run_dir, log = tmp_path / "outputs" / "r", tmp_path / "run.log"
    process = start(ARGS, tmp_path, log)
    wait_for_step(process, run_dir, 1, log)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 128 + signal.SIGINT, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "rlkit: SIGINT after SIGINT: stopping now, without a checkpoint" in text, text
    rlkit(ARGS, tmp_path).check()  # whatever the second signal interrupted, the run resumes
    assert_matches_reference(run_dir, reference)


# 4. non-finite numbers


def test_infinite_and_nan_rewards_are_scored_failure_value_and_counted(tmp_path: Path):
    args = fast_overrides(
        "reward.fn=probe_rewards:non_finite_digit_share", "trainer.max_steps=2", "eval.pass_k=0", "run_name=inf"
    )
    rlkit(["train", *args], tmp_path, env=cli_env(PYTHONPATH=str(REPO / "tests"))).check()
    run_dir = tmp_path / "outputs" / "inf"
    for record in train_records(run_dir):
        assert record["reward/non_finite_digit_share/failures"] == 12  # 3 of every 4 of the 16 samples
        assert all(math.isfinite(record[k]) for k in ("reward/mean", "actor/grad_norm", "actor/kl")), record
        assert record["train/skipped_steps"] == 0
    import torch

    assert all(torch.isfinite(w).all() for w in load_weights(run_dir / "checkpoints" / "2").values())


def test_a_loss_that_stays_non_finite_stops_the_run_in_one_line(tmp_path: Path):
    args = fast_overrides(
        "reward=math",
        "+reward.terms.a={fn: 'probe_rewards:huge'}",
        "+reward.terms.b={fn: 'probe_rewards:huge'}",  # 1e308 + 1e308 = inf: NaN advantages, NaN loss
        "trainer.max_steps=4",
        "trainer.save_every=1",
        "trainer.max_skipped_steps=2",
        "eval.pass_k=0",
        "run_name=nan",
    )
    result = rlkit(["train", *args], tmp_path, env=cli_env(PYTHONPATH=str(REPO / "tests")))
    assert_one_line_error(result, "stopped at step 2", "2 optimizer steps in a row skipped", "non-finite loss", code=1)
    assert "step 1: 1 optimizer step(s) skipped (non-finite loss)" in result.stdout + result.stderr
    run_dir = tmp_path / "outputs" / "nan"
    assert [m["train/skipped_steps"] for m in train_records(run_dir)] == [1, 2]
    assert complete_checkpoints(run_dir) == [1], "no checkpoint after the stop"
    import torch

    warm = load_weights(run_dir / "warmstart")
    assert all(torch.equal(warm[k], w) for k, w in load_weights(run_dir / "checkpoints" / "1").items()), (
        "a skipped step must not change the weights"
    )


# 5. the run directory


def test_a_non_empty_directory_that_is_not_a_run_is_refused(tmp_path: Path):
    run_dir = tmp_path / "outputs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.md").write_text("my notes")
    result = rlkit(ARGS, tmp_path, timeout=120)
    assert_one_line_error(result, str(run_dir), "not an rlkit run", "notes.md", "trainer.allow_nonempty_dir", code=2)
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "cli.log", "notes.md"]  # Hydra's own, and the user's
    assert (run_dir / "notes.md").read_text() == "my notes"


def test_resuming_with_a_changed_config_is_refused_unless_forced(reference: Path, tmp_path: Path):
    run_dir = copy_run(reference, tmp_path)
    before = (run_dir / "config.yaml").read_text()
    result = rlkit([*ARGS, "algo.optim.lr=5e-6"], tmp_path, timeout=300)
    assert_one_line_error(result, "checkpoints/4", "algo.optim.lr", "resume=force", code=2)
    assert (run_dir / "config.yaml").read_text() == before
    assert not (run_dir / "config.0.yaml").exists()

    forced = rlkit([*ARGS, "algo.optim.lr=5e-6", "resume=force"], tmp_path).check()
    assert "algo.optim.lr" in forced.stdout + forced.stderr  # the log names what changed
    from omegaconf import OmegaConf

    assert OmegaConf.load(run_dir / "config.yaml").algo.optim.lr == 5e-6
    assert (run_dir / "config.0.yaml").read_text() == before
    segments = read_json(run_dir / "rlkit_run.json")["segments"]
    assert [(s["from_step"], s["config"]) for s in segments] == [(0, "config.0.yaml"), (4, "config.yaml")]


# 6. bad input files: one line naming the file, line and field, before any model is built


def test_malformed_data_files_fail_in_one_line_before_any_model(tmp_path: Path):
    import gzip

    gsm8k = tmp_path / "gsm8k"
    gsm8k.mkdir()
    good = json.dumps({"question": "1+1?", "answer": "#### 2"})
    (gsm8k / "train.jsonl").write_text((good + "\n") * 8)
    (gsm8k / "test.jsonl").write_text(good + "\n" + json.dumps({"question": ["a list"], "answer": "#### 2"}) + "\n")
    humaneval = tmp_path / "HumanEval.jsonl.gz"
    humaneval.write_bytes(
        gzip.compress(b"".join(json.dumps({"prompt": str(i), "tests": ""}).encode() + b"\n" for i in range(300)))[:200]
    )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "\xff"}\n')
    cases = [
        (["task=gsm8k", f"task.path={gsm8k}"], ["test.jsonl' line 2: field 'question' is a list"]),
        (["task=humaneval", f"task.path={humaneval}"], ["HumanEval.jsonl.gz' is not a complete gzip file"]),
        (["algo=dpo", "task=preference", f"task.path={pairs}"], ["pairs.jsonl' line 2: not UTF-8 text"]),
    ]
    for overrides, expected in cases:
        result = rlkit(["train", *overrides, "logger.mode=disabled", "run_name=bad"], tmp_path, timeout=300)
        assert_one_line_error(result, *expected, code=2)
        assert not list(tmp_path.rglob("initial_model")) and not list(tmp_path.rglob("metrics.jsonl"))


# 7. a reward that runs code needs bubblewrap: missing, it is found before any model is built


def test_a_missing_bubblewrap_is_one_line_before_any_model(tmp_path: Path):
    import sys

    humaneval = tmp_path / "code.jsonl"
    rows = [{"prompt": f"def f{i}():\n", "tests": f"assert f{i}() is None\n"} for i in range(12)]
    humaneval.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = cli_env(PATH=str(Path(sys.executable).parent))  # the venv's scripts only: no bwrap
    result = rlkit(
        ["train", "task=code", f"task.path={humaneval}", "task.options.test_size=4", "logger.mode=disabled"],
        tmp_path,
        env=env,
        timeout=300,
    )
    assert_one_line_error(result, "reward 'tests' cannot run here", "bubblewrap", code=2)
    assert len(result.stderr.strip().splitlines()) == 1, result.describe()
    assert not list(tmp_path.rglob("initial_model"))


def test_rlkit_eval_of_a_damaged_checkpoint_is_one_line(reference: Path, tmp_path: Path):
    run_dir = copy_run(reference, tmp_path)
    damage(run_dir / "checkpoints" / "4" / "model.safetensors", "random bytes")
    result = rlkit(["eval", f"checkpoint={run_dir / 'checkpoints' / '4'}"], tmp_path, timeout=300)
    assert_one_line_error(result, "is damaged: model.safetensors does not match its checksum", code=2)
