"""``rlkit eval checkpoint=PATH``: the run report for any checkpoint."""

from __future__ import annotations

import json
import os

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlkit.checkpoint import CONFIG_FILE, DamagedCheckpoint, verify_checkpoint
from rlkit.config import ConfigError, typed_config
from rlkit.engine import init_distributed, is_main_process
from rlkit.eval import evaluate_policy
from rlkit.eval.report import Report
from rlkit.run import build_run, load_model, seed_everything
from rlkit.validate import validate


def parse_args(args: list[str]) -> tuple[str, str | None, list[str]]:
    """(checkpoint, output_dir, remaining key=value overrides)."""
    checkpoint, output_dir, overrides = None, None, []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"'{arg}' is not key=value (e.g. checkpoint=outputs/default/checkpoints/100)")
        if key == "checkpoint":
            checkpoint = value
        elif key == "output_dir":
            output_dir = value
        else:
            overrides.append(arg)
    if not checkpoint:
        raise ConfigError("give checkpoint=PATH (an rlkit checkpoint directory)")
    if not os.path.isfile(os.path.join(checkpoint, CONFIG_FILE)):
        raise ConfigError(f"checkpoint={checkpoint}: not an rlkit checkpoint (no {CONFIG_FILE})")
    try:
        verify_checkpoint(checkpoint)
    except DamagedCheckpoint as damage:
        raise ConfigError(f"checkpoint={checkpoint} is damaged: {damage}") from None
    return checkpoint, output_dir, overrides


def load_config(checkpoint: str, overrides: list[str]):
    try:
        cfg = typed_config(OmegaConf.load(os.path.join(checkpoint, CONFIG_FILE)), overrides)
    except OmegaConfBaseException as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    cfg.resume = "never"
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    return cfg


def evaluate_checkpoint(args: list[str]) -> dict:
    checkpoint, output_dir, overrides = parse_args(args)
    cfg = load_config(checkpoint, overrides)
    output_dir = output_dir or os.path.join(checkpoint, "eval")
    os.makedirs(output_dir, exist_ok=True)
    init_distributed(cfg.hardware.device)
    seed_everything(cfg.seed)
    run = build_run(cfg, output_dir)
    model, run.tokenizer = load_model(run, checkpoint, lora=False)  # a LoRA checkpoint: merged into its base
    model.eval()
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        step = json.load(f)["step"]
    result = evaluate_policy(run, model)
    if is_main_process():
        report = Report(
            output_dir,
            {
                "run_name": cfg.run_name,
                "checkpoint": os.path.abspath(checkpoint),
                "algo": cfg.algo.name,
                "task": cfg.task.name,
            },
        )
        report.add(step, f"checkpoint {step}", result)
        report.write()
        print(f"accuracy {result['accuracy']:.3f}; report in {output_dir}/report.md")
    return result
