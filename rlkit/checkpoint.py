"""Atomic, resumable checkpoints.

``<run>/checkpoints/<step>/`` holds a transformers model + tokenizer at its top
level (``AutoModelForCausalLM.from_pretrained`` loads it), ``training_state/``
(DeepSpeed's model/optimizer/scheduler state), ``trainer_state.json`` (step, data
position, W&B run id, ...), ``rlkit_config.yaml`` and ``rng_rank<r>.pt``. It is written under a temporary
name and renamed when complete, so a crash never leaves a half checkpoint that
resume would pick.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from rlkit.engine import barrier, is_main_process, rank

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "rlkit_config.yaml"
ENGINE_DIR = "training_state"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    steps = sorted(
        int(n) for n in os.listdir(root) if n.isdigit() and os.path.isfile(os.path.join(root, n, STATE_FILE))
    )
    return [os.path.join(root, str(s)) for s in steps]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str,
    step: int,
    engine,
    tokenizer,
    trainer_state: dict[str, Any],
    config,
    keep: int,
    extra_engines: dict[str, Any] | None = None,
) -> str:
    """Write checkpoint ``step`` atomically (collective: every rank calls it).
    ``extra_engines`` (e.g. a separate critic) go to ``training_state_<name>/``."""
    root = checkpoint_root(run_dir)
    final = os.path.join(root, str(step))
    tmp = os.path.join(root, f".tmp-{step}")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    engine.save_checkpoint(os.path.join(tmp, ENGINE_DIR), tag="state", save_latest=False)
    for name, extra in (extra_engines or {}).items():
        extra.save_checkpoint(os.path.join(tmp, f"{ENGINE_DIR}_{name}"), tag="state", save_latest=False)
    save_hf_model(engine, tokenizer, tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank()}.pt"))
    barrier()
    if is_main_process():
        OmegaConf.save(config, os.path.join(tmp, CONFIG_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({**trainer_state, "step": step}, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0. Collective: under ZeRO-3 every rank must call it
    (the shards are gathered layer by layer) and ranks other than 0 get None."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def save_hf_model(engine, tokenizer, directory: str) -> None:
    """The engine's model as a plain transformers checkpoint (collective, see :func:`full_state_dict`)."""
    state_dict = full_state_dict(engine)
    if is_main_process():
        engine.module.save_pretrained(directory, state_dict=state_dict)
        tokenizer.save_pretrained(directory)


def load_checkpoint(path: str, engine, extra_engines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore engine states and this rank's RNG; returns the trainer state."""
    engine.load_checkpoint(os.path.join(path, ENGINE_DIR), tag="state")
    for name, extra in (extra_engines or {}).items():
        extra.load_checkpoint(os.path.join(path, f"{ENGINE_DIR}_{name}"), tag="state")
    rng_file = os.path.join(path, f"rng_rank{rank()}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)
