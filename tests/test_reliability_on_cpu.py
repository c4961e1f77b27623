"""Unit tests of the reliability pieces: atomic writes, the metrics truncation, checkpoint
manifests, the non-finite guard (rewards, loss, gradients, weights), the run directory's
checks and segment history, and the stop signals. The end-to-end versions (real runs killed,
damaged and resumed) are in test_reliability_e2e.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlkit import atomic
from rlkit.checkpoint import DamagedCheckpoint, check_finite_weights, verify_checkpoint, write_manifest
from rlkit.config import ConfigError
from rlkit.errors import RunError
from rlkit.eval.report import Report, read_metrics, truncate_metrics
from rlkit.rewards.registry import CompositeReward, RewardTermFn
from rlkit.run_dir import check_output_dir, check_resume_config, config_changes, record_segment

# --------------------------------------------------------------------------- atomic writes


def test_an_atomic_write_replaces_the_file_or_leaves_it_untouched(tmp_path: Path):
    path = tmp_path / "report.json"
    atomic.write_json(str(path), {"v": 1})
    with pytest.raises(RuntimeError), atomic.atomic_open(str(path)) as f:
        f.write('{"v": 2, "cut')
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"], "the temporary file is removed"
    atomic.write_text(str(path), '{"v": 3}')
    assert json.loads(path.read_text()) == {"v": 3}


def test_a_sigkill_before_the_rename_leaves_the_old_file(tmp_path: Path):
    path = tmp_path / "state.json"
    path.write_text('{"old": true}')
    code = f"from rlkit import atomic; atomic.write_json({str(path)!r}, {{'new': True}})"
    env = {**os.environ, atomic.KILL_ENV: "state.json"}
    done = subprocess.run([sys.executable, "-c", code], env=env)
    assert done.returncode == -signal.SIGKILL
    assert json.loads(path.read_text()) == {"old": True}
    assert json.loads(Path(atomic.temporary_path(str(path))).read_text()) == {"new": True}  # complete, never renamed
    atomic.write_json(str(path), {"next": 1})  # the leftover is simply overwritten
    assert json.loads(path.read_text()) == {"next": 1} and not Path(atomic.temporary_path(str(path))).exists()


def test_the_kill_hook_counts_occurrences(tmp_path: Path):
    code = "from rlkit import atomic\nfor i in range(3):\n    print(i, flush=True)\n    atomic.kill_point('x')"
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, atomic.KILL_ENV: "x@2"}, capture_output=True, text=True
    )
    assert done.returncode == -signal.SIGKILL and done.stdout.split() == ["0", "1"]


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path: Path):
    target = tmp_path / "warmstart"

    def write(files: dict[str, str]):
        def fill(tmp: str) -> None:
            os.makedirs(tmp)
            for name, text in files.items():
                Path(tmp, name).write_text(text)

        return fill

    atomic.replace_directory(str(target), write({"config.json": "1", "model": "a"}))

    def broken(tmp: str) -> None:
        write({"config.json": "2"})(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic.replace_directory(str(target), broken)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"config.json": "1", "model": "a"}
    atomic.replace_directory(str(target), write({"config.json": "3"}))
    assert {p.name: p.read_text() for p in target.iterdir()} == {"config.json": "3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warmstart"]  # no temporary or old directory left


def test_metrics_truncation_drops_later_steps_and_damaged_lines(tmp_path: Path):
    lines = [b'{"step": 1, "a": 1.0}\n', b'{"step": 2, "a": 2.0}\n', b"\xff\xfe not text\n", b'{"step": 1, "b": 3}\n']
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(lines) + b'{"step": 3, "a": 3.0}\n{"step": 4, "a"')
    truncate_metrics(str(tmp_path), 2)
    assert [(m["step"], sorted(m)) for m in read_metrics(str(tmp_path))] == [
        (1, ["a", "step"]),
        (2, ["a", "step"]),
        (1, ["b", "step"]),
    ]


def test_an_unreadable_report_is_a_warning_not_a_crash(tmp_path: Path, caplog):
    (tmp_path / "report.json").write_text("")
    assert Report(str(tmp_path), {}).evaluations == []
    assert "report.json is unreadable" in caplog.text


# --------------------------------------------------------------------------- checkpoint manifests


def make_checkpoint(directory: Path, manifest: bool = True) -> Path:
    from safetensors.torch import save_file

    (directory / "training_state" / "state").mkdir(parents=True)
    torch.save({"weights": torch.arange(1000.0)}, directory / "training_state" / "state" / "mp_rank_00_model_states.pt")
    save_file({"w": torch.ones(100)}, str(directory / "model.safetensors"))
    torch.save({"torch": torch.get_rng_state()}, directory / "rng_rank0.pt")
    (directory / "rlkit_config.yaml").write_text("seed: 1\n")
    state = {"step": 2, "run_id": "abc", **({"checkpoint_format": 2} if manifest else {})}
    (directory / "trainer_state.json").write_text(json.dumps(state))
    if manifest:
        write_manifest(str(directory))
    return directory


def test_a_manifest_catches_every_change_to_a_file(tmp_path: Path):
    checkpoint = make_checkpoint(tmp_path / "2")
    verify_checkpoint(str(checkpoint))
    model = checkpoint / "training_state" / "state" / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    model.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match="mp_rank_00_model_states.pt does not match its checksum"):
        verify_checkpoint(str(checkpoint))
    (checkpoint / "manifest.json").unlink()
    with pytest.raises(DamagedCheckpoint, match="manifest.json is missing"):
        verify_checkpoint(str(checkpoint))  # trainer_state.json says there was one


def test_a_checkpoint_without_manifest_is_checked_for_loadability(tmp_path: Path):
    checkpoint = make_checkpoint(tmp_path / "2", manifest=False)
    verify_checkpoint(str(checkpoint))
    model = checkpoint / "training_state" / "state" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:-200])
    with pytest.raises(DamagedCheckpoint, match="mp_rank_00_model_states.pt cannot be loaded"):
        verify_checkpoint(str(checkpoint))


def test_non_finite_weights_are_never_saved():
    model = torch.nn.Linear(2, 2)
    engine = types.SimpleNamespace(module=model)
    check_finite_weights({"policy": engine}, 3)
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(RunError, match="policy weight 'bias' is not finite at step 3; no checkpoint saved"):
        check_finite_weights({"policy": engine}, 3)


# --------------------------------------------------------------------------- non-finite rewards


def test_non_finite_rewards_score_failure_value_and_are_counted(caplog):
    values = [float("inf"), float("-inf"), float("nan"), 0.5]
    reward = CompositeReward([RewardTermFn("odd", lambda p, c, **_: values, 2.0, failure_value=-1.0)])
    totals, per_term = reward(["p"] * 4, ["c"] * 4)
    assert per_term["odd"] == [-1.0, -1.0, -1.0, 0.5] and totals == [-2.0, -2.0, -2.0, 1.0]
    assert reward.pop_failures() == {"odd": 3}
    assert "reward 'odd' failed on 3 of 4 samples, scored -1.0 (first: returned inf)" in caplog.text


# --------------------------------------------------------------------------- the optimizer step guard


def engine_for(stage: int):
    from rlkit.engine import build_engine, init_distributed

    init_distributed("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    hardware = types.SimpleNamespace(
        offload_optimizer=False, fused_optimizer=False, zero_stage=stage, dtype="float32", deepspeed=OmegaConf.create()
    )
    return build_engine(
        model,
        hardware,
        lr=0.05,
        betas=[0.9, 0.999],
        weight_decay=0.01,
        max_grad_norm=1.0,
        schedule="linear",
        warmup_steps=0,
        total_steps=10,
        micro_batch_per_device=2,
        grad_accum_steps=2,
        world=1,
    )


X = torch.linspace(-1, 1, 16).reshape(4, 4)
BAD_LOSSES = {
    "nan loss": lambda out: out.sum() * float("nan"),
    "inf loss": lambda out: out.sum() + float("inf"),
    "finite loss, inf gradient": lambda out: out.sum() + (out - out.detach()).sum().abs().sqrt(),  # d sqrt(x)/dx at 0
}


def updates(engine, bad: str | None) -> float:
    from rlkit.engine import optimizer_step

    def loss(index):
        out = engine(X[index])
        return BAD_LOSSES[bad](out) if bad and index.start == 2 else (out**2).sum()

    return optimizer_step(engine, [slice(0, 2), slice(2, 4)], loss)


def snapshot(engine) -> list[torch.Tensor]:
    state = engine.optimizer.state_dict()
    flat = [p.detach().clone() for p in engine.module.parameters()]
    return flat + [torch.tensor(engine.lr_scheduler.get_last_lr())] + [torch.tensor(float(len(str(state))))]


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("bad", list(BAD_LOSSES))
def test_a_non_finite_step_is_skipped_as_if_it_never_happened(stage: int, bad: str):
    from rlkit.engine.step import SKIPPED

    SKIPPED.load_state_dict({"total": 0, "consecutive": 0})
    guarded, plain = engine_for(stage), engine_for(stage)
    for engine, sequence in ((guarded, [None, bad, bad, None, None]), (plain, [None, None, None])):
        norms = [updates(engine, b) for b in sequence]
        assert all(math.isfinite(n) for n, b in zip(norms, sequence) if b is None)
    assert SKIPPED.total == 2 and SKIPPED.consecutive == 0
    assert guarded.skipped_steps == 2 and guarded.global_steps == plain.global_steps + 2
    for got, want in zip(snapshot(guarded), snapshot(plain)):
        assert torch.equal(got, want)  # weights, Adam moments, LR schedule: as if the bad steps never ran
    got_state, want_state = guarded.optimizer.state_dict(), plain.optimizer.state_dict()
    if stage == 0:
        for key in want_state["state"]:
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(
                    torch.as_tensor(got_state["state"][key][name]), torch.as_tensor(want_state["state"][key][name])
                )


# --------------------------------------------------------------------------- the run directory


def test_only_empty_dirs_and_rlkit_runs_are_written_into(tmp_path: Path):
    hydra = (".hydra", "cli.log")
    check_output_dir(str(tmp_path / "new"), False)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "cli.log").write_text("")
    check_output_dir(str(tmp_path), False, hydra)
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(ConfigError, match=r"is not empty \(thesis.tex\) and is not an rlkit run"):
        check_output_dir(str(tmp_path), False, hydra)
    check_output_dir(str(tmp_path), True, hydra)  # trainer.allow_nonempty_dir=true
    (tmp_path / "rlkit_run.json").write_text("{}")
    check_output_dir(str(tmp_path), False, hydra)


def test_a_run_from_before_the_marker_is_recognised(tmp_path: Path):
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError):
        check_output_dir(str(tmp_path), False)  # a config.yaml alone could be anybody's
    (tmp_path / "metrics.jsonl").write_text("")
    check_output_dir(str(tmp_path), False)


def test_config_changes_that_matter(tmp_path: Path):
    old = {"algo": {"lr": 1e-6, "kl": {"coef": 0.0}}, "trainer": {"max_steps": 10, "prompts_per_step_global": 8}}
    new = {"algo": {"lr": 1e-6, "kl": {"coef": 0.1}}, "trainer": {"max_steps": 20, "prompts_per_step_global": 8}}
    assert config_changes(old, new) == [("algo.kl.coef", 0.0, 0.1), ("trainer.max_steps", 10, 20)]
    assert config_changes(old, new, ("algo", "trainer.prompts_per_step_global")) == [("algo.kl.coef", 0.0, 0.1)]
    checkpoint = tmp_path / "checkpoints" / "2"
    checkpoint.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(old), checkpoint / "rlkit_config.yaml")
    resumed = OmegaConf.create({**new, "resume": "auto"})
    with pytest.raises(ConfigError, match=r"algo.kl.coef: 0.0 -> 0.1\); resume=force continues"):
        check_resume_config(resumed, str(tmp_path), str(checkpoint))
    check_resume_config(resumed, str(tmp_path), None)  # no checkpoint and no earlier config: a new run
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="was started with another config"):
        check_resume_config(resumed, str(tmp_path), None)  # killed before its first checkpoint: its warm start stays
    resumed.resume = "force"
    check_resume_config(resumed, str(tmp_path), str(checkpoint))
    longer = OmegaConf.create({**old, "trainer": {**old["trainer"], "max_steps": 50}, "resume": "auto"})
    check_resume_config(longer, str(tmp_path), str(checkpoint))


def test_each_segment_keeps_its_config(tmp_path: Path):
    def segment(lr: float, step: int) -> str:
        checkpoint = None
        if step:
            checkpoint = tmp_path / "checkpoints" / str(step)
            checkpoint.mkdir(parents=True, exist_ok=True)
            (checkpoint / "trainer_state.json").write_text(json.dumps({"step": step, "run_id": "from-checkpoint"}))
        return record_segment(OmegaConf.create({"algo": {"lr": lr}}), str(tmp_path), checkpoint and str(checkpoint))

    run_id = segment(1.0, 0)
    assert segment(1.0, 2) == run_id  # the marker's id wins over the checkpoint's
    segment(2.0, 4)
    segment(3.0, 6)
    marker = json.loads((tmp_path / "rlkit_run.json").read_text())
    assert [(s["from_step"], s["config"]) for s in marker["segments"]] == [
        (0, "config.0.yaml"),
        (2, "config.0.yaml"),
        (4, "config.2.yaml"),
        (6, "config.yaml"),
    ]
    lr = lambda name: OmegaConf.load(tmp_path / name).algo.lr  # noqa: E731
    assert (lr("config.0.yaml"), lr("config.2.yaml"), lr("config.yaml")) == (1.0, 2.0, 3.0)


# --------------------------------------------------------------------------- stop signals


def test_a_stop_signal_is_noted_then_a_second_one_exits_at_once():
    code = (
        "import os, signal, time\n"
        "from rlkit.preemption import PreemptionWatch, requeue_and_exit_code\n"
        "watch = PreemptionWatch(['SIGUSR1'], ['SIGTERM', 'SIGINT'])\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "assert watch.requested() and not watch.requeue\n"
        "stop = watch.stop(7)\n"
        "print(requeue_and_exit_code(stop), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(5)\n"
        "print('not reached')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 128 + signal.SIGINT
    assert done.stdout.split() == [str(128 + signal.SIGTERM)]
    assert done.stderr.splitlines() == [
        "rlkit: SIGTERM received: saving a checkpoint at the end of this step, then stopping (send it again to stop at once)",
        "rlkit: stopped by SIGTERM after step 7; checkpoint saved; run the same command to resume",
        "rlkit: SIGINT after SIGTERM: stopping now, without a checkpoint",
    ]


def test_a_damaged_model_directory_is_a_one_line_error(tmp_path: Path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from rlkit.models.loading import from_pretrained

    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match=f"cannot load '{tmp_path}': ") as error:
        from_pretrained(AutoModelForCausalLM, str(tmp_path))
    assert "\n" not in str(error.value)


def test_a_checkpoint_of_the_earlier_config_layout_is_named_as_such(tmp_path: Path):
    checkpoint = tmp_path / "checkpoints" / "2"
    checkpoint.mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create({"algo": {"name": "grpo", "advantage": "grpo", "lr": 1e-6}}), checkpoint / "rlkit_config.yaml"
    )
    resumed = OmegaConf.create({"algo": {"name": "grpo", "advantage": {"name": "grpo"}}, "resume": "auto"})
    with pytest.raises(ConfigError, match=r"earlier config layout \(algo.advantage is a name"):
        check_resume_config(resumed, str(tmp_path), str(checkpoint))
    resumed.resume = "force"
    check_resume_config(resumed, str(tmp_path), str(checkpoint))
