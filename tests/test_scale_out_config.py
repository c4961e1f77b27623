"""Scale-out configuration without launching anything: hardware presets down to the DeepSpeed
config, the checks on the new keys, and the preemption signal watch."""

from __future__ import annotations

import os
import signal

import pytest


@pytest.mark.parametrize(
    "preset, stage", [("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3), ("multinode", 2)]
)
def test_hardware_presets_reach_deepspeed(preset: str, stage: int, compose_config):
    from rlkit.engine.deepspeed_engine import deepspeed_config

    cfg = compose_config(f"hardware={preset}", "hardware.deepspeed.zero_optimization.reduce_bucket_size=123")
    config = deepspeed_config(cfg.hardware, micro_batch_per_device=4, grad_accum_steps=2, world=8, max_grad_norm=1.0)
    assert config["zero_optimization"]["stage"] == stage and config["train_batch_size"] == 64
    assert config["bf16"]["enabled"] and cfg.hardware.device == "cuda"
    assert (
        config["zero_optimization"]["reduce_bucket_size"] == 123
    )  # any DeepSpeed key, overridden from the command line
    if preset == "zero3_offload":
        assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
        assert config["zero_optimization"]["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize(
    "override, message",
    [
        ("hardware.num_procs=0", "hardware.num_procs=0: must be at least 1"),
        ("trainer.preempt_signals=[SIGKILL]", "trainer.preempt_signals=['SIGKILL']: 'SIGKILL' is not one of"),
        ("hardware.num_procs=3", "trainer.prompts_per_step_global=32 must divide evenly over 3 processes"),
        (
            "hardware.dtype=float8",
            "hardware.dtype='float8': must be one of: float32, bfloat16, float16",
        ),
    ],
)
def test_scale_out_keys_are_checked(override: str, message: str, compose_config):
    from rlkit.config import ConfigError
    from rlkit.validate import validate

    cfg = compose_config(override)
    with pytest.raises(ConfigError) as error:
        validate(cfg, cfg.hardware.num_procs)
    assert message in str(error.value)


def test_preemption_watch_notes_its_signals_only():
    from rlkit.preemption import PreemptionWatch

    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        watch = PreemptionWatch(["SIGUSR2"])
        assert not watch.requested()
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert not watch.requested()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert watch.requested() and watch.received == signal.SIGUSR2
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
