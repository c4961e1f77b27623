"""Same seed, same numbers, whatever else the machine is doing (docs/reproducibility.md).

Each job runs twice, the second time beside a busy process pinned to the first core, and every
logged number but timings, and the final weights, must agree bit for bit. The one-process job
runs 2 threads on a batch whose shared-prompt KV-cache gather has a backward of at least 32,768
elements with every prompt in both threads' halves: without ``hardware.deterministic`` PyTorch
adds that backward with atomic float adds in whatever order the threads reach them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import cli_env, fast_overrides, read_metrics, rlkit

from rlkit.engine.determinism import CUBLAS_WORKSPACE_CONFIG, deterministic_enabled, use_deterministic_algorithms

two_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores: one for the busy process")

STEPS = 2
JOB = fast_overrides(
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "model.warmstart.steps=2",
    "eval.num_examples=8",
    "eval.pass_k=0",
    "model.tiny.hidden_size=256",  # 32 rows a process x 256 x >= 6 prompt tokens: >= 32,768 gathered values
    "trainer.prompts_per_step_global=8",
    "algo.group_size=8",
    "task.options.train_size=2",  # a process's 4 or 8 prompts from 2 rows: each in both threads' halves of the batch
    "task.max_new_tokens=12",
)
BUSY = "import os\nos.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\nwhile True:\n    pass\n"


@contextmanager
def busy_core():
    """A process spinning on the first core this one may use, for the duration of the block."""
    spinner = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def logged_numbers(run_dir: Path) -> list[dict]:
    """Every metrics.jsonl record without its timings."""
    timing = ("time/", "throughput/")
    return [{k: v for k, v in record.items() if not k.startswith(timing)} for record in read_metrics(run_dir)]


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / str(STEPS) / "model.safetensors")


def train_twice(tmp_path: Path, args: list[str], env: dict[str, str]) -> tuple[Path, Path]:
    """The job run alone, then beside a busy core; their run directories."""
    rlkit(["train", *args, "run_name=alone"], tmp_path, env=env).check()
    with busy_core():
        rlkit(["train", *args, "run_name=loaded"], tmp_path, env=env).check()
    return tmp_path / "outputs" / "alone", tmp_path / "outputs" / "loaded"


def assert_identical(alone: Path, loaded: Path) -> None:
    got, want = logged_numbers(loaded), logged_numbers(alone)
    assert len(got) == len(want) and any("actor/kl" in record for record in want)
    for a, b in zip(got, want):
        assert a == b, f"step {b.get('step')}: { ({k: (a.get(k), v) for k, v in b.items() if a.get(k) != v}) }"
    a, b = final_weights(loaded), final_weights(alone)
    assert a.keys() == b.keys()
    differing = [name for name in a if not a[name].equal(b[name])]
    assert not differing, f"final weights differ in {differing}"


TWO_THREADS = dict(
    OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE"
)  # passive: 2 processes share 2 cores


@pytest.mark.slow
@two_cores
def test_one_process_repeats_bit_for_bit_under_load(tmp_path: Path):
    assert_identical(*train_twice(tmp_path, JOB, cli_env(**TWO_THREADS)))


@pytest.mark.slow
@two_cores
def test_two_processes_repeat_bit_for_bit_under_load(tmp_path: Path):
    assert_identical(*train_twice(tmp_path, [*JOB, "hardware.num_procs=2"], cli_env(**TWO_THREADS)))


def hardware(device: str, deterministic: bool | None) -> SimpleNamespace:
    return SimpleNamespace(device=device, deterministic=deterministic)


def test_deterministic_by_default_on_cpu_only():
    assert deterministic_enabled(hardware("cpu", None))
    assert not deterministic_enabled(hardware("cuda", None))
    assert not deterministic_enabled(hardware("cpu", False))
    assert deterministic_enabled(hardware("cuda", True))


def test_switch_sets_torch_and_cublas(monkeypatch):
    import torch
    import torch.utils.deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        assert use_deterministic_algorithms(hardware("cuda", True))
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG
        assert not torch.utils.deterministic.fill_uninitialized_memory
        assert not use_deterministic_algorithms(hardware("cpu", False))
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = True
