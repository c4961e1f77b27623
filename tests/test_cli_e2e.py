"""End to end: the real ``rlkit`` CLI in subprocesses, on the tiny model and CPU.

Every run works in a temporary directory (``outputs/`` lands there) with the fast
overrides of ``conftest.FAST_OVERRIDES``. The expensive runs are module-scoped
fixtures shared by several tests.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    CliResult,
    cli_env,
    complete_checkpoints,
    fast_overrides,
    read_json,
    read_metrics,
    rlkit,
    rlkit_executable,
    train_records,
)

pytestmark = pytest.mark.slow

# The shared run: 6 steps, evaluation and a checkpoint every 2 (keep_checkpoints=2 leaves 4 and 6);
# a decaying LR so that resuming must restore the schedule too.
MAIN_ARGS = ["train", *fast_overrides("trainer.max_steps=6", "algo.optim.schedule=linear", "run_name=main")]

PER_STEP_KEYS = (
    "reward/mean",
    "reward/zero_variance_group_frac",
    "response/length_mean",
    "response/truncated_frac",
    "actor/kl",
    "actor/entropy",
    "actor/clip_frac",
    "actor/grad_norm",
    "time/rollout",
    "time/update",
    "throughput/tokens_per_s",
)


def is_timing(key: str) -> bool:
    return key.startswith(("time/", "throughput/"))


def load_weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def logged_step(run_dir: Path, step: int) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and f'{{"step": {step}, "reward/mean"' in metrics.read_text()


def step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line (None for a line cut short by the kill)."""
    try:
        return json.loads(line)["step"]
    except json.JSONDecodeError:
        return None


def assert_clean_failure(result: CliResult, *expected: str) -> None:
    """Non-zero exit, no Python traceback, one ``rlkit: error: ...`` line that names what is wrong."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, result.describe()
    assert "Traceback" not in output, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlkit: error: "), result.describe()
    for text in expected:
        assert text in result.stderr, f"{text!r} not in the error message\n{result.describe()}"


@pytest.fixture(scope="module")
def main_run(tmp_path_factory) -> Path:
    """An uninterrupted 6-step run; returns its run dir."""
    cwd = tmp_path_factory.mktemp("main")
    rlkit(MAIN_ARGS, cwd).check()
    return cwd / "outputs" / "main"


# 1. train -> report, plots, resolved config, per-step metrics


def test_train_writes_report_plots_config_and_metrics(main_run: Path):
    report = read_json(main_run / "report.json")
    assert [e["step"] for e in report["evaluations"]] == [0, 2, 4, 6]
    for evaluation in report["evaluations"]:
        assert 0.0 <= evaluation["accuracy"] <= 1.0
        assert evaluation["num_examples"] == 16
        assert {"pass@1", "pass@2", "reward_mean", "samples"} <= set(evaluation)
    assert report["run_name"] == "main" and report["max_steps"] == 6
    for name in ("report.md", "reward.png", "accuracy.png"):
        assert (main_run / name).stat().st_size > 0, name
    assert "Held-out accuracy" in (main_run / "report.md").read_text()

    from omegaconf import OmegaConf

    config = OmegaConf.load(main_run / "config.yaml")
    assert "${" not in OmegaConf.to_yaml(config), "config.yaml must be the resolved config"
    assert config.run_name == "main" and config.trainer.max_steps == 6 and config.algo.name == "grpo"
    assert config.algo.optim.schedule == "linear"
    assert config.algo.optim.lr is None  # null: the model preset's learning rate, which the run logs
    lrs = [m["actor/lr"] for m in train_records(main_run)]  # the linear schedule from the model's rate
    assert lrs == pytest.approx([config.model.lr * (6 - step) / 6 for step in range(1, 7)])

    records = train_records(main_run)
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        missing = [k for k in PER_STEP_KEYS if k not in record]
        assert not missing, f"step {record['step']} lacks {missing}"
        assert all(math.isfinite(record[k]) for k in PER_STEP_KEYS), record
        assert record["actor/grad_norm"] >= 0 and record["throughput/tokens_per_s"] > 0
        assert 0 <= record["reward/zero_variance_group_frac"] <= 1 and 0 <= record["response/truncated_frac"] <= 1
    lrs = [m["actor/lr"] for m in records]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1], lrs  # linear decay
    evaluations = [m for m in read_metrics(main_run) if "eval/accuracy" in m]
    assert [m["step"] for m in evaluations] == [0, 2, 4, 6]


# 2. checkpoints: plain transformers, rotation, no temporary dirs


def test_checkpoint_loads_with_plain_transformers(main_run: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = main_run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["4", "6"], "keep_checkpoints=2 keeps the two newest only"
    assert not [p for p in main_run.rglob("*") if ".tmp" in p.name], "temporary checkpoint/model dirs left behind"
    assert read_json(root / "6" / "trainer_state.json")["step"] == 6

    model = AutoModelForCausalLM.from_pretrained(root / "6")
    tokenizer = AutoTokenizer.from_pretrained(root / "6")
    inputs = tokenizer(["12+34="], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(output[0]), str)


# 3. kill -9 and resume: continues from the newest complete checkpoint, bit-identical to no interruption


def test_kill_and_resume_matches_uninterrupted_run(main_run: Path, tmp_path: Path):
    assert_kill_and_resume_matches(MAIN_ARGS, main_run, tmp_path)


def test_resume_from_explicit_checkpoint_path(main_run: Path, tmp_path: Path):
    """``resume=<checkpoint>`` into a fresh run dir: no report there, so the run first
    evaluates at the checkpoint's step; that evaluation's sampling must not shift the
    random stream, so steps 5-6 and the final weights match the uninterrupted run."""
    rlkit([*MAIN_ARGS, f"resume={main_run / 'checkpoints' / '4'}"], tmp_path).check()
    run_dir = tmp_path / "outputs" / "main"
    assert [m["step"] for m in train_records(run_dir)] == [5, 6]
    report = read_json(run_dir / "report.json")
    assert [(e["step"], e["label"]) for e in report["evaluations"]] == [(4, "step 4"), (6, "final")]
    reference = {e["step"]: e for e in read_json(main_run / "report.json")["evaluations"]}
    assert [e["accuracy"] for e in report["evaluations"]] == [reference[4]["accuracy"], reference[6]["accuracy"]]
    for got, want in zip(train_records(run_dir), train_records(main_run)[4:]):
        assert {k: v for k, v in got.items() if not is_timing(k)} == {
            k: v for k, v in want.items() if not is_timing(k)
        }, got["step"]
    import torch

    got, want = load_weights(run_dir / "checkpoints" / "6"), load_weights(main_run / "checkpoints" / "6")
    assert not [name for name in want if not torch.equal(got[name], want[name])]


# 4. rlkit eval


def test_eval_checkpoint_writes_report(main_run: Path):
    checkpoint = main_run / "checkpoints" / "6"
    result = rlkit(["eval", f"checkpoint={checkpoint}"], main_run.parent.parent).check()
    assert "accuracy" in result.stdout
    report = read_json(checkpoint / "eval" / "report.json")
    [evaluation] = report["evaluations"]
    assert evaluation["step"] == 6 and 0.0 <= evaluation["accuracy"] <= 1.0
    assert evaluation["num_examples"] == 16
    # greedy accuracy of the same weights on the same problems: what training reported at step 6
    trained = read_json(main_run / "report.json")["evaluations"][-1]
    assert evaluation["accuracy"] == trained["accuracy"]
    assert (checkpoint / "eval" / "report.md").is_file()


def test_eval_bad_checkpoint_path_fails_cleanly(tmp_path: Path):
    result = rlkit(["eval", f"checkpoint={tmp_path / 'no_such_checkpoint'}"], tmp_path)
    assert_clean_failure(result, "no_such_checkpoint", "not an rlkit checkpoint")


# 5. bad overrides fail fast, before any model is built

BAD_OVERRIDES = [
    ("algo=nope", ["algo=nope", "grpo", "dapo"]),  # no such config group option: the valid ones
    ("trainer.nope=1", ["trainer.nope", "max_steps"]),  # not in the schema: the node's settings
    ("task.options.nope=1", ["task.options.nope"]),  # a task option is new unless '+' adds it
    ("+task.options.nope=1", ["task.options.nope", "train_size"]),  # the task's options
    ("algo.loss_agg=bad", ["algo.loss_agg", "token-mean"]),
    ("hardware.zero_stage=7", ["hardware.zero_stage", "0, 1, 2, 3"]),
    ("reward.fn=no_such_module:f", ["reward.fn", "no_such_module"]),
    ("algo.rebel_eta=5", ["algo.rebel_eta", "'grpo'", "group_size"]),  # a setting of another algorithm
    ("algo.policy_loss.eta=5", ["algo.policy_loss.eta", "'clipped'", "clip_low, clip_high"]),
    ("algo.advantage=rloo", ["algo/advantage=rloo"]),  # a component is chosen as a config group
    ("algo/advantage=nope", ["algo/advantage=nope", "rloo"]),
    ("algo.policy_loss.clip_low=abc", ["algo.policy_loss.clip_low=abc", "Float"]),
    ("algo.group_size=1", ["algo.group_size=1", "a group of one"]),
]


@pytest.mark.parametrize("override, expected", BAD_OVERRIDES, ids=[case[0] for case in BAD_OVERRIDES])
def test_bad_override_fails_with_short_message(tmp_path: Path, override: str, expected: list[str]):
    result = rlkit(["train", override, "logger.mode=disabled"], tmp_path, timeout=120)
    assert_clean_failure(result, *expected)
    assert not list(tmp_path.rglob("initial_model")), "a model was built before the config was rejected"
    assert not list(tmp_path.rglob("metrics.jsonl"))


# 6. GSM8K from local files


def test_gsm8k_from_local_files(tmp_path: Path, gsm8k_dir: Path):
    args = fast_overrides(
        "task=gsm8k",
        f"task.path={gsm8k_dir}",
        "task.max_train_rows=200",
        "task.max_new_tokens=16",
        "eval.num_examples=8",
        "trainer.max_steps=2",
        "model.warmstart.steps=2",
        "run_name=gsm8k",
        drop=("task.options.train_size", "task.options.test_size"),
    )
    rlkit(["train", *args], tmp_path).check()
    run_dir = tmp_path / "outputs" / "gsm8k"
    report = read_json(run_dir / "report.json")
    assert report["task"] == "gsm8k"
    assert [e["step"] for e in report["evaluations"]] == [0, 2]
    assert all(0.0 <= e["accuracy"] <= 1.0 and e["num_examples"] == 8 for e in report["evaluations"])
    assert "Janet" in report["evaluations"][0]["samples"][0]["prompt"]  # the first GSM8K test problem
    assert [m["step"] for m in train_records(run_dir)] == [1, 2]
    assert all(m["response/length_mean"] <= 16 for m in train_records(run_dir))


# 7. multirun


def test_multirun_two_seeds(tmp_path: Path):
    args = fast_overrides(
        "trainer.max_steps=2",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "model.warmstart.steps=2",
        "eval.num_examples=8",
        "eval.pass_k=0",
    )
    rlkit(["train", "--multirun", "seed=1,2", *args], tmp_path).check()
    [sweep] = list((tmp_path / "outputs" / "multirun").iterdir())
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2, runs
    seeds = []
    for run in runs:
        report = read_json(run / "report.json")
        assert [e["step"] for e in report["evaluations"]] == [0, 2]
        seeds.append(report["seed"])
        assert complete_checkpoints(run) == [2]
    assert sorted(seeds) == [1, 2]


# 8. --cfg job; a model loaded from a local directory (model=hf)


def test_cfg_job_prints_config(tmp_path: Path):
    import yaml

    result = rlkit(["train", "--cfg", "job", "trainer.max_steps=3"], tmp_path, timeout=120).check()
    config = yaml.safe_load(result.stdout)
    assert (
        config["trainer"]["max_steps"] == 3 and config["algo"]["name"] == "grpo" and config["model"]["name"] == "tiny"
    )
    assert not (tmp_path / "outputs").exists()


def test_hf_model_from_local_checkpoint(main_run: Path, tmp_path: Path):
    source = main_run / "checkpoints" / "6"
    args = fast_overrides(
        "model=hf",
        f"model.name_or_path={source}",
        "model.warmstart.steps=0",
        "trainer.max_steps=2",
        "eval.num_examples=8",
        "run_name=hf",
        drop=("model.tiny.hidden_size", "model.tiny.intermediate_size"),
    )
    rlkit(["train", *args], tmp_path).check()
    run_dir = tmp_path / "outputs" / "hf"
    report = read_json(run_dir / "report.json")
    assert report["model"] == str(source)
    assert [e["step"] for e in report["evaluations"]] == [0, 2]
    assert not (run_dir / "initial_model").exists() and not (run_dir / "warmstart").exists()
    assert [m["step"] for m in train_records(run_dir)] == [1, 2]
    assert complete_checkpoints(run_dir) == [2]


# 9. a user reward function from a module on PYTHONPATH


def test_user_reward_function(tmp_path: Path):
    (tmp_path / "my_rewards.py").write_text(
        "def short_answer(prompts, completions, **row_fields):\n"
        "    assert 'answer' in row_fields and len(row_fields['answer']) == len(completions)\n"
        "    return [1.0 if len(c) <= 8 else 0.0 for c in completions]\n"
    )
    args = fast_overrides(
        "reward.fn=my_rewards:short_answer",
        "trainer.max_steps=2",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "model.warmstart.steps=2",
        "eval.num_examples=8",
        "eval.pass_k=0",
        "run_name=reward",
    )
    rlkit(["train", *args], tmp_path, env=cli_env(PYTHONPATH=str(tmp_path))).check()
    records = train_records(tmp_path / "outputs" / "reward")
    assert [m["step"] for m in records] == [1, 2]
    for record in records:
        assert 0.0 <= record["reward/short_answer/mean"] <= 1.0
        assert record["reward/mean"] == record["reward/short_answer/mean"]  # the only term, weight 1
        assert "reward/answer/mean" not in record  # reward.fn replaces the preset's terms


def assert_kill_and_resume_matches(args: list[str], reference_run: Path, tmp_path: Path) -> None:
    """Run ``rlkit <args>`` (6 steps, a checkpoint every 2, keep 2) in ``tmp_path``, kill -9 it once
    checkpoint 2 is complete and step 3 is logged, run it again: it must resume from its newest
    complete checkpoint and end exactly as ``reference_run`` (the same command, uninterrupted) did:
    the same metrics at every step, evaluations and bit-identical final weights."""
    run_dir = tmp_path / "outputs" / reference_run.name
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [rlkit_executable(), *args], cwd=tmp_path, env=cli_env(), stdout=out, stderr=subprocess.STDOUT
        )
        try:
            # Kill it once checkpoint 2 is complete and step 3 is logged: the resumed run must
            # start from the checkpoint, not from the last step it logged, and log step 3 once.
            deadline = time.monotonic() + 300
            while not ((run_dir / "checkpoints" / "2" / "trainer_state.json").is_file() and logged_step(run_dir, 3)):
                assert process.poll() is None, (
                    f"the run exited ({process.returncode}) before step 3:\n{log.read_text()[-3000:]}"
                )
                assert time.monotonic() < deadline, "no step 3 within 300 s"
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL

    newest = complete_checkpoints(run_dir)[-1]
    assert 2 <= newest < 6, f"the killed run got to checkpoint {newest}; nothing left to resume"
    run_id = read_json(run_dir / "checkpoints" / str(newest) / "trainer_state.json")["run_id"]
    before = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_before = [step_of(line) for line in before]
    kept_before = [line for line, step in zip(before, steps_before) if step is not None and step <= newest]

    rlkit(args, tmp_path).check()

    # Resumed, not restarted: the records up to the checkpoint are the killed run's own
    # (their wall times would differ had the steps been redone), then each step once.
    after = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert after[: len(kept_before)] == kept_before
    assert min(json.loads(line)["step"] for line in after[len(kept_before) :]) == newest + 1
    resumed, reference = train_records(run_dir), train_records(reference_run)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert read_json(run_dir / "checkpoints" / "6" / "trainer_state.json")["run_id"] == run_id
    assert [e["step"] for e in read_json(run_dir / "report.json")["evaluations"]] == [0, 2, 4, 6]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["4", "6"]  # no .tmp-* either

    # Same rollouts, rewards, losses and gradient norms at every step as the uninterrupted run ...
    for got, want in zip(resumed, reference):
        assert {k: v for k, v in got.items() if not is_timing(k)} == {
            k: v for k, v in want.items() if not is_timing(k)
        }, got["step"]
    assert [e["accuracy"] for e in read_json(run_dir / "report.json")["evaluations"]] == [
        e["accuracy"] for e in read_json(reference_run / "report.json")["evaluations"]
    ]
    # ... and bit-identical final weights (RNG, sampler position, optimizer and LR schedule all restored).
    import torch

    got, want = load_weights(run_dir / "checkpoints" / "6"), load_weights(reference_run / "checkpoints" / "6")
    assert got.keys() == want.keys()
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, f"resumed weights differ from the uninterrupted run's in {different}"
