"""Atomic, verified, resumable checkpoints.

``<run>/checkpoints/<step>/`` holds a transformers model + tokenizer at its top
level (``AutoModelForCausalLM.from_pretrained`` loads it; a LoRA run's adapter in peft's format
instead, which ``rlkit export`` merges into its base), ``training_state/``
(DeepSpeed's model/optimizer/scheduler state; of a LoRA model only the adapter), ``trainer_state.json`` (step, data
position, W&B run id, ...), ``rlkit_config.yaml``, ``rng_rank<r>.pt`` and, written last,
``manifest.json``: the size and SHA-256 of every other file. The directory is written under a
temporary name, fsync'ed and renamed when complete, so a crash never leaves a half checkpoint
that resume would pick; the manifest catches what happens to the files afterwards (truncation,
flipped bytes, deleted files). A checkpoint of an older rlkit (no manifest, ``trainer_state.json``
without ``checkpoint_format``) is checked for completeness and loadability only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from multiprocessing.pool import ThreadPool
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from rlkit import atomic
from rlkit.engine import all_gather_objects, all_reduce_sum, barrier, is_main_process, rank
from rlkit.errors import RunError
from rlkit.models.lora import has_lora, save_adapter

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "rlkit_config.yaml"
ENGINE_DIR = "training_state"
MANIFEST_FILE = "manifest.json"
FORMAT = 2  # trainer_state.json's checkpoint_format: 2 = with a manifest
log = logging.getLogger(__name__)


class DamagedCheckpoint(Exception):
    """A checkpoint that fails verification; the message names the file and what is wrong."""


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint directories of a run (intact or not), oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    steps = sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n)))
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
    ``extra_engines`` (e.g. a separate critic) go to ``training_state_<name>/``.
    Raises :class:`RunError` instead of saving weights that are not finite."""
    check_finite_weights({"policy": engine, **(extra_engines or {})}, step)
    root = checkpoint_root(run_dir)
    final = os.path.join(root, str(step))
    tmp = os.path.join(root, f".tmp-{step}")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    save_engine(engine, os.path.join(tmp, ENGINE_DIR))
    for name, extra in (extra_engines or {}).items():
        save_engine(extra, os.path.join(tmp, f"{ENGINE_DIR}_{name}"))
    atomic.kill_point("checkpoint")
    save_hf_model(engine, tokenizer, tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank()}.pt"))
    barrier()
    if is_main_process():
        OmegaConf.save(config, os.path.join(tmp, CONFIG_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({**trainer_state, "step": step, "checkpoint_format": FORMAT}, f, indent=2)
        write_manifest(tmp)
        atomic.publish_directory(tmp, final)
        rotate_checkpoints(run_dir, keep)
    barrier()
    return final


def rotate_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (0 keeps all). Called right after a
    checkpoint was written and verified by construction, so the newest intact one always stays."""
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def check_finite_weights(engines: dict[str, Any], step: int) -> None:
    """Raise :class:`RunError` on every rank if any rank holds a non-finite weight (collective)."""
    bad = next(
        (
            f"{role} weight '{name}'"
            for role, engine in engines.items()
            for name, parameter in engine.module.named_parameters()
            if not bool(
                torch.isfinite(getattr(parameter, "ds_tensor", parameter).detach()).all()
            )  # ZeRO-3: this rank's shard
        ),
        None,
    )
    if all_reduce_sum(float(bad is not None)):
        where = next((b for b in all_gather_objects(bad) if b), "a weight")
        raise RunError(f"{where} is not finite at step {step}; no checkpoint saved (the last saved one is intact)")


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_entries(directory: str) -> list[str]:
    """Every file under ``directory`` (relative paths), the manifest itself excepted."""
    return sorted(
        os.path.relpath(os.path.join(parent, name), directory)
        for parent, _, files in os.walk(directory)
        for name in files
        if not (parent == directory and name == MANIFEST_FILE)
    )


def write_manifest(directory: str) -> None:
    """``manifest.json``: size and SHA-256 of every file, hashed in parallel (large files
    hash at ~0.5 GB/s a core); written last, atomically."""
    files = manifest_entries(directory)
    with ThreadPool(min(8, max(1, len(files)))) as pool:
        digests = pool.map(lambda f: file_digest(os.path.join(directory, f)), files)
    entries = {f: {"size": os.path.getsize(os.path.join(directory, f)), "sha256": d} for f, d in zip(files, digests)}
    atomic.write_json(os.path.join(directory, MANIFEST_FILE), {"format": FORMAT, "files": entries})


def verify_checkpoint(path: str) -> None:
    """Raise :class:`DamagedCheckpoint` naming the first file that is missing, cut short or changed."""
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        state = read_state(path)
        if state.get("checkpoint_format", 1) >= FORMAT:
            raise DamagedCheckpoint(f"{MANIFEST_FILE} is missing")
        verify_legacy(path)
        return
    try:
        with open(manifest_path, "rb") as f:
            entries = json.load(f)["files"]
        expected = {name: (int(e["size"]), str(e["sha256"])) for name, e in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DamagedCheckpoint(f"{MANIFEST_FILE} is unreadable ({error})") from None
    for name, (size, _) in expected.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise DamagedCheckpoint(f"{name} is missing")
        if os.path.getsize(file) != size:
            raise DamagedCheckpoint(f"{name} has {os.path.getsize(file)} bytes, {size} expected")
    names = list(expected)
    with ThreadPool(min(8, max(1, len(names)))) as pool:
        digests = pool.map(lambda n: file_digest(os.path.join(path, n)), names)
    for name, digest in zip(names, digests):
        if digest != expected[name][1]:
            raise DamagedCheckpoint(f"{name} does not match its checksum")
    for required in (STATE_FILE, CONFIG_FILE):
        if required not in expected:
            raise DamagedCheckpoint(f"{required} is missing")


def read_state(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, STATE_FILE), "rb") as f:
            state = json.load(f)
        int(state["step"])
        return state
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{STATE_FILE} is missing") from None
    except (ValueError, KeyError, TypeError) as error:
        raise DamagedCheckpoint(f"{STATE_FILE} is unreadable ({error})") from None


def verify_legacy(path: str) -> None:
    """A checkpoint without a manifest (rlkit before checkpoint_format 2): every part present
    and loadable. Bytes changed inside a tensor cannot be detected without checksums."""
    try:
        OmegaConf.load(os.path.join(path, CONFIG_FILE))
    except Exception as error:  # noqa: BLE001  (yaml or I/O: damaged either way)
        raise DamagedCheckpoint(f"{CONFIG_FILE} is unreadable ({type(error).__name__})") from None
    engine_files = [
        os.path.join(parent, name)
        for parent, _, files in os.walk(os.path.join(path, ENGINE_DIR))
        for name in files
        if name.endswith(".pt")
    ]
    if not engine_files:
        raise DamagedCheckpoint(f"{ENGINE_DIR}/ is missing or empty")
    pt_files = engine_files + [os.path.join(path, n) for n in os.listdir(path) if n.endswith(".pt")]
    for file in [*pt_files, os.path.join(path, "model.safetensors")]:
        name = os.path.relpath(file, path)
        if not os.path.isfile(file):
            raise DamagedCheckpoint(f"{name} is missing")
        try:
            if file.endswith(".pt"):
                torch.load(file, map_location="cpu", weights_only=False, mmap=True)
            else:
                from safetensors.torch import load_file

                load_file(file)
        except Exception as error:  # noqa: BLE001  (any loader error means damage)
            raise DamagedCheckpoint(f"{name} cannot be loaded ({type(error).__name__})") from None


def newest_intact_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint that verifies (collective: rank 0 checks, every rank gets the answer).
    Newer damaged ones are reported in one line each and moved aside to ``checkpoints/damaged-<step>``;
    if there are checkpoints but none is intact, :class:`RunError` (nothing is moved)."""
    answer: tuple[str | None, str | None] = (None, None)
    if is_main_process():
        answer = _choose(run_dir)
    chosen, error = all_gather_objects(answer)[0]
    if error:
        raise RunError(error)
    return chosen


def _choose(run_dir: str) -> tuple[str | None, str | None]:
    found = list_checkpoints(run_dir)
    damaged = []
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint as damage:
            damaged.append((path, str(damage)))
            continue
        for bad, reason in damaged:
            aside = set_aside(bad)
            log.warning(
                "checkpoint %s is damaged (%s): skipped and moved to %s; resuming from %s",
                bad,
                reason,
                aside,
                path,
            )
        return path, None
    if damaged:
        listed = "; ".join(f"{os.path.basename(p)}: {reason}" for p, reason in damaged)
        return None, f"no intact checkpoint in {checkpoint_root(run_dir)} ({listed}); resume=never starts the run over"
    return None, None


def set_aside(path: str) -> str:
    """Rename a damaged checkpoint out of the list (kept for inspection, never loaded or rotated)."""
    root, step = os.path.split(path)
    target, suffix = os.path.join(root, f"damaged-{step}"), 1
    while os.path.exists(target):
        target, suffix = os.path.join(root, f"damaged-{step}.{suffix}"), suffix + 1
    os.replace(path, target)
    atomic.fsync_directory(root)
    return target


def verified_checkpoint(path: str) -> str:
    """An explicitly named checkpoint (``resume=PATH``), verified; :class:`RunError` if damaged."""
    error = None
    if is_main_process():
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint as damage:
            error = f"resume={path}: the checkpoint is damaged: {damage}"
    error = all_gather_objects(error)[0]
    if error:
        raise RunError(error)
    return path


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0. Collective: under ZeRO-3 every rank must call it
    (the shards are gathered layer by layer) and ranks other than 0 get None."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def save_engine(engine, directory: str) -> None:
    """DeepSpeed's state of ``engine`` (model, optimizer, schedule); of a LoRA model only the
    trainable part (the adapter, a value head): its frozen base is the run's start model."""
    frozen_left_out = {"exclude_frozen_parameters": True} if has_lora(engine) else {}
    engine.save_checkpoint(directory, tag="state", save_latest=False, **frozen_left_out)


def load_engine(engine, directory: str) -> None:
    """Restore what :func:`save_engine` saved (a LoRA model's base stays as loaded from the start model)."""
    partial = {"load_module_strict": False} if has_lora(engine) else {}
    engine.load_checkpoint(directory, tag="state", **partial)


def save_hf_model(engine, tokenizer, directory: str) -> None:
    """The engine's model as a plain transformers checkpoint, or a LoRA model's adapter in peft's
    format, with the tokenizer (collective, see :func:`full_state_dict`)."""
    state_dict = full_state_dict(engine)
    if is_main_process():
        if has_lora(engine):
            save_adapter(engine, directory, state_dict)
        else:
            engine.module.save_pretrained(directory, state_dict=state_dict)
        tokenizer.save_pretrained(directory)


def load_checkpoint(path: str, engine, extra_engines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore engine states and this rank's RNG; returns the trainer state."""
    load_engine(engine, os.path.join(path, ENGINE_DIR))
    for name, extra in (extra_engines or {}).items():
        load_engine(extra, os.path.join(path, f"{ENGINE_DIR}_{name}"))
    rng_file = os.path.join(path, f"rng_rank{rank()}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)
