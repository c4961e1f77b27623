"""Every policy-gradient and SFT preset trains end to end: two steps of the real trainer,
in-process (hydra compose + rlkit.trainer.train), on a 32-wide tiny model, and the
policy's weights change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST_OVERRIDES, runs_on_default_task, two_step_overrides

CONF_ALGO = Path(__file__).resolve().parents[1] / "conf" / "algo"
PRESETS = sorted(p.stem for p in CONF_ALGO.glob("*.yaml"))


def distinct_characters(prompts, completions, **_) -> list[float]:
    """A dense reward a random model already earns (distinct characters per character), so
    samples differ and every estimator gives a gradient."""
    return [len(set(c)) / (len(c) + 1) for c in completions]


def preset_loop(name: str) -> str:
    from hydra import compose, initialize_config_module

    from rlkit.config import register_schema

    register_schema()
    with initialize_config_module(config_module="rlkit.conf", version_base="1.3"):
        return compose("config", overrides=["run_name=x", f"algo={name}"]).algo.loop


def trains_on_sampled_or_reference_text(name: str) -> bool:
    """SFT, and the policy-gradient loop or any loop built on it (e.g. nlpo): they run on the
    arithmetic task (preference loops need pair data; multi-turn presets an environment)."""
    from rlkit.loops import LOOPS
    from rlkit.loops.policy_gradient import PolicyGradientLoop

    loop = preset_loop(name)
    online = loop == "sft" or (loop in LOOPS and issubclass(LOOPS.get(loop), PolicyGradientLoop))
    return online and runs_on_default_task(name)


@pytest.fixture(scope="module")
def train_preset(tmp_path_factory, compose_config):
    from rlkit.trainer import train
    from rlkit.validate import validate

    def _train(name: str, *extra: str, run_dir: Path | None = None) -> Path:
        run_dir = run_dir or tmp_path_factory.mktemp(name)
        overrides = two_step_overrides()
        cfg = compose_config(
            f"algo={name}", f"reward.fn={__name__}:distinct_characters", "algo.optim.lr=1e-3", *overrides, *extra
        )
        validate(cfg)
        train(cfg, str(run_dir))
        return run_dir

    return _train


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in PRESETS if trains_on_sampled_or_reference_text(n)])
def test_preset_trains_two_steps_and_changes_the_policy(train_preset, name):
    run_dir = train_preset(name)
    before, after = load_weights(run_dir / "initial_model"), load_weights(run_dir / "checkpoints" / "2")
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed, f"algo={name}: no weight changed in two steps"
    assert "value_head.weight" not in before  # the initial model is a plain causal LM


def test_fast_overrides_have_the_keys_this_file_changes():
    keys = {o.partition("=")[0] for o in FAST_OVERRIDES}
    assert {"trainer.max_steps", "algo.group_size", "trainer.prompts_per_step_global"} <= keys


def train_steps(run_dir: Path) -> list[dict]:
    import json

    return [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"reward/mean"' in line
    ]


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["critic", "value_head"])
def test_ppo_critic_is_checkpointed_and_resumed(train_preset, critic):
    """Two steps, then a resumed third: the critic must come back trained. A fresh value
    head outputs 0 everywhere, which makes the explained variance of step 3 exactly 0."""
    run_dir = train_preset("ppo", f"algo/value_source={critic}", "trainer.save_every=1")
    assert (run_dir / "checkpoints" / "2" / "training_state_critic").is_dir() == (critic == "critic")
    train_preset("ppo", f"algo/value_source={critic}", "trainer.save_every=1", "trainer.max_steps=3", run_dir=run_dir)
    steps = train_steps(run_dir)
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert steps[0]["critic/explained_variance"] == 0.0  # the zero-initialised head
    assert steps[2]["critic/explained_variance"] != 0.0
