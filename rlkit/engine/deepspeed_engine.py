"""Wrapping a model, its optimizer and LR schedule in a DeepSpeed engine."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import OmegaConf


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """LR multiplier at optimizer step ``s``: linear warm-up, then constant, linear or cosine decay."""

    def multiplier(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def deepspeed_config(
    hardware, micro_batch_per_device: int, grad_accum_steps: int, world: int, max_grad_norm: float
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_per_device,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_per_device * grad_accum_steps * world,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": hardware.zero_stage},
        "bf16": {"enabled": hardware.dtype == "bfloat16"},
        "fp16": {"enabled": hardware.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if hardware.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return _deep_merge(config, OmegaConf.to_container(hardware.deepspeed, resolve=True))  # plain dicts merge by key


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def build_engine(
    model,
    hardware,
    *,
    lr: float,
    betas,
    weight_decay: float,
    max_grad_norm: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    micro_batch_per_device: int,
    grad_accum_steps: int,
    world: int,
):
    """A DeepSpeed engine around ``model`` with AdamW and the LR schedule.

    A torch optimizer is passed in (not DeepSpeed's fused one), which avoids a JIT
    compile on CPU; with optimizer offload DeepSpeed's CPU Adam is required. With
    ``hardware.fused_optimizer`` the torch AdamW is its fused kernel (one pass over each
    tensor instead of a dozen elementwise ops: on CPU it steps a 25M model in 10 ms against
    63 ms for the per-tensor loop). It is off by default because two runs of one seed then
    differ in the last bits after a few steps, where the loop reproduces them exactly.
    """
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if hardware.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    else:
        optimizer = torch.optim.AdamW(
            params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=hardware.fused_optimizer
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, total_steps))
    config = deepspeed_config(hardware, micro_batch_per_device, grad_accum_steps, world, max_grad_norm)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        # averaging gradients over one process changes nothing, but DeepSpeed would still flatten,
        # all-reduce and copy them back after every backward (45 ms per step of a 25M model on CPU)
        engine.enable_backward_allreduce = False
    return engine
