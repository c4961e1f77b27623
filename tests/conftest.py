"""Shared helpers for the tests: running the real ``rlkit`` CLI in a subprocess
with a fast, offline configuration, and reading what a run leaves on disk."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Tests never touch the network: hub lookups fail fast, W&B stays off.
for _key, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("HF_DATASETS_OFFLINE", "1"),
    ("WANDB_MODE", "disabled"),
    ("DS_ACCELERATOR", "cpu"),
):
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared/data/gsm8k"

# A run of the tiny model that finishes in seconds: 4 prompts x 4 samples per step,
# a 5-step warm start, 16 held-out problems, a 32-wide model.
FAST_OVERRIDES = (
    "trainer.max_steps=4",
    "trainer.eval_every=2",
    "trainer.save_every=2",
    "model.warmstart.steps=5",
    "eval.num_examples=16",
    "eval.pass_k=2",
    "task.options.train_size=300",
    "task.options.test_size=40",
    "trainer.prompts_per_step_global=4",
    "algo.group_size=4",
    "logger.mode=disabled",
    "logger.progress_bar=false",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
)


def fast_overrides(*changes: str, drop: tuple[str, ...] = ()) -> list[str]:
    """FAST_OVERRIDES with ``key=value`` changes applied (same key replaced, new keys
    appended) and the keys in ``drop`` left out (Hydra rejects a key given twice)."""

    def key(override: str) -> str:
        return override.partition("=")[0]

    changed = {key(c): c for c in changes}
    args = [changed.pop(key(o), o) for o in FAST_OVERRIDES if key(o) not in drop]
    return args + [c for c in changes if key(c) in changed]


def small_split_overrides(*changes: str, drop: tuple[str, ...] = ()) -> list[str]:
    """:func:`fast_overrides` on a small arithmetic split (64 training and 8 held-out problems, 2 prompts
    per step), with no warm start and no evaluation before the last one (4 problems, no pass@k)."""
    return fast_overrides(
        "trainer.eval_every=0",
        "eval.num_examples=4",
        "eval.pass_k=0",
        "model.warmstart.steps=0",
        "task.options.train_size=64",
        "task.options.test_size=8",
        "trainer.prompts_per_step_global=2",
        *changes,
        drop=drop,
    )


def two_step_overrides() -> list[str]:
    """Two training steps of a preset on the small split (2 prompts of the preset's group size), with no
    checkpoint in between."""
    return small_split_overrides("trainer.max_steps=2", "trainer.save_every=0", drop=("algo.group_size",))


def rlkit_executable() -> str:
    """The ``rlkit`` console script of the interpreter running the tests."""
    found = shutil.which("rlkit", path=str(Path(sys.executable).parent)) or shutil.which("rlkit")
    if not found:
        pytest.skip("the rlkit console script is not installed (pip install -e .)")
    return found


def cli_env(**extra: str) -> dict[str, str]:
    """Offline, W&B off, DeepSpeed on CPU; one torch thread per run (the CPU is shared,
    and oversubscribed OpenMP threads make tiny models several times slower)."""
    env = dict(os.environ)
    for key in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "HYDRA_FULL_ERROR",
    ):
        env.pop(key, None)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


@dataclasses.dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self, lines: int = 40) -> str:
        tail = "\n".join((self.stdout + "\n" + self.stderr).strip().splitlines()[-lines:])
        return f"`rlkit {' '.join(self.args)}` exited {self.returncode} after {self.seconds:.0f}s; output tail:\n{tail}"

    def check(self) -> CliResult:
        assert self.returncode == 0, self.describe()
        return self


def rlkit(args: list[str], cwd: Path, *, env: dict[str, str] | None = None, timeout: float = 600) -> CliResult:
    """Run ``rlkit <args>`` in ``cwd`` (so ``outputs/`` lands there) and capture it."""
    started = time.perf_counter()
    done = subprocess.run(
        [rlkit_executable(), *args], cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout
    )
    return CliResult(list(args), done.returncode, done.stdout, done.stderr, time.perf_counter() - started)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl records of training steps (not evaluations or checkpoint timings)."""
    return [m for m in read_metrics(run_dir) if "reward/mean" in m or "sft/loss" in m]


def complete_checkpoints(run_dir: Path) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "trainer_state.json").is_file())


@pytest.fixture
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").is_file() or not (GSM8K_DIR / "test.jsonl").is_file():
        pytest.skip(f"GSM8K files not found in {GSM8K_DIR}")
    return GSM8K_DIR


@functools.cache
def runs_on_default_task(preset: str) -> bool:
    """``rlkit train algo=<preset>`` validates with the default task (the multi-turn presets need an
    environment task; tests/test_multi_turn_e2e.py trains them)."""
    from hydra import compose, initialize_config_module

    from rlkit.config import register_schema
    from rlkit.settings import ConfigError
    from rlkit.validate import validate

    register_schema()
    with initialize_config_module(config_module="rlkit.conf", version_base="1.3"):
        try:
            validate(compose("config", overrides=["run_name=x", f"algo={preset}"]))
        except ConfigError:
            return False
    return True


@pytest.fixture(scope="module")
def compose_config():
    """Compose ``conf/config.yaml`` with overrides, as ``rlkit train`` does, resolved (run_name fixed)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import rlkit.cli
    from rlkit.config import register_schema

    register_schema()
    if not OmegaConf.has_resolver("rlkit_run_name"):
        OmegaConf.register_new_resolver("rlkit_run_name", rlkit.cli.run_name)

    def _compose(*overrides: str):
        composed = compose("config", overrides=["run_name=test", *overrides])
        OmegaConf.resolve(composed)
        return composed

    with initialize_config_module(config_module="rlkit.conf", version_base="1.3"):
        yield _compose


@pytest.fixture(scope="module")
def config_error(compose_config):
    """The one-line error ``rlkit train <overrides>`` gives before any heavy work (while composing,
    or from validation), or None when the config is valid."""
    from rlkit.config import ConfigError
    from rlkit.overrides import check_overrides
    from rlkit.validate import validate

    def _error(*overrides: str) -> str | None:
        try:
            check_overrides(list(overrides))
            validate(compose_config(*overrides))
        except ConfigError as error:
            return str(error)
        return None

    return _error
