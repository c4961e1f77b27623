"""The run directory's own safety: rlkit writes only into an empty directory or its own run
(``rlkit_run.json`` marks one), resumes only a run whose config still matches in what matters,
and keeps the config of every segment of a resumed run, so ``config.yaml`` never describes steps
it did not produce.

``rlkit_run.json`` holds the W&B run id (written at the start, before anything else, so a run
killed before its first checkpoint keeps its id) and the segments: ``{"from_step", "started",
"resumed_from", "config"}``, where ``config`` names the file holding that segment's config:
``config.yaml`` for the current one, ``config.<i>.yaml`` for earlier ones that differed.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rlkit import atomic
from rlkit.checkpoint import CONFIG_FILE, STATE_FILE
from rlkit.config import ConfigError, old_layout_key
from rlkit.engine import all_gather_objects, is_main_process
from rlkit.run import new_run_id

MARKER = "rlkit_run.json"
RUN_CONFIG = "config.yaml"
# What a resumed run may not change without resume=force: its model, algorithm, task, reward,
# data order (seed), batch shape and training precision.
MATTERS = (
    "model",
    "algo",
    "task",
    "reward",
    "seed",
    "trainer.prompts_per_step_global",
    "hardware.dtype",
    "hardware.zero_stage",
)
log = logging.getLogger(__name__)


def is_rlkit_run(run_dir: str) -> bool:
    """The marker (or its temporary file: killed while writing it), or the layout of a run written
    before the marker existed (config.yaml plus metrics, checkpoints or the initial model)."""
    marker = os.path.join(run_dir, MARKER)
    if os.path.isfile(marker) or os.path.isfile(atomic.temporary_path(marker)):
        return True
    return os.path.isfile(os.path.join(run_dir, RUN_CONFIG)) and any(
        os.path.exists(os.path.join(run_dir, name)) for name in ("metrics.jsonl", "checkpoints", "initial_model")
    )


def check_output_dir(run_dir: str, allow_nonempty: bool, ignored: tuple[str, ...] = ()) -> None:
    """:class:`ConfigError` for a directory holding files (other than ``ignored``, e.g. Hydra's own)
    that is not an rlkit run, unless ``allow_nonempty`` (``trainer.allow_nonempty_dir``)."""
    entries = sorted(set(os.listdir(run_dir)) - set(ignored)) if os.path.isdir(run_dir) else []
    if entries and not allow_nonempty and not is_rlkit_run(run_dir):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(
            f"run dir {run_dir} is not empty ({shown}) and is not an rlkit run: choose another run_name or "
            "hydra.run.dir, or set trainer.allow_nonempty_dir=true to write there anyway"
        )


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config container as ``{dotted key: leaf value}`` (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(old: dict, new: dict, prefixes: tuple[str, ...] | None = None) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` of every differing leaf (under ``prefixes``, if given), sorted."""
    old_flat, new_flat = flatten(old), flatten(new)
    keys = sorted(set(old_flat) | set(new_flat))
    if prefixes is not None:
        keys = [k for k in keys if any(k == p or k.startswith(p + ".") for p in prefixes)]
    missing = "<absent>"
    return [
        (k, old_flat.get(k, missing), new_flat.get(k, missing))
        for k in keys
        if old_flat.get(k, missing) != new_flat.get(k, missing)
    ]


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    key, old, new = changes[0]
    more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
    return f"{key}: {old!r} -> {new!r}{more}"


def check_resume_config(cfg, run_dir: str, checkpoint: str | None) -> None:
    """With ``resume=auto``: :class:`ConfigError` when the checkpoint (or, before the first one, the
    run's last segment, whose initial model and warm start are reused) had another model, algorithm,
    task, reward, seed, batch shape or precision (``resume=force`` goes on anyway)."""
    source = os.path.join(checkpoint, CONFIG_FILE) if checkpoint else os.path.join(run_dir, RUN_CONFIG)
    if cfg.resume != "auto" or not os.path.isfile(source):
        return
    saved = OmegaConf.load(source)
    if old_layout_key(saved):
        raise ConfigError(
            f"resume: {checkpoint or run_dir} was written with rlkit's earlier config layout ({old_layout_key(saved)} "
            "is a name, not a component node); resume=force continues from its weights and state with this config"
        )
    old = OmegaConf.to_container(saved, resolve=True)
    changes = config_changes(old, OmegaConf.to_container(cfg, resolve=True), MATTERS)
    if changes:
        raise ConfigError(
            f"resume: {checkpoint or run_dir} was started with another config ({describe(changes)}); "
            "resume=force continues with the new config, another run_name starts a new run"
        )


def start_segment(cfg, run_dir: str, checkpoint: str | None) -> str:
    """Check the config against the checkpoint, then (rank 0) record this segment in the marker and
    write ``config.yaml`` atomically; returns the run id (collective: every rank gets rank 0's)."""
    check_resume_config(cfg, run_dir, checkpoint)
    run_id = record_segment(cfg, run_dir, checkpoint) if is_main_process() else None
    return all_gather_objects(run_id)[0]


def read_marker(run_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir, MARKER)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, "rb") as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) else {}
    except ValueError:  # written atomically by rlkit, so damaged by something else: start a new history
        log.warning("%s is unreadable; its segment history starts over", path)
        return {}


def record_segment(cfg, run_dir: str, checkpoint: str | None) -> str:
    state = read_json(os.path.join(checkpoint, STATE_FILE)) if checkpoint else {}
    marker = read_marker(run_dir)
    run_id = marker.get("run_id") or state.get("run_id") or new_run_id()
    segments = marker.get("segments")
    if not isinstance(segments, list):
        segments = [{"from_step": 0, "config": RUN_CONFIG}] if os.path.isfile(os.path.join(run_dir, RUN_CONFIG)) else []
    new_yaml = OmegaConf.to_yaml(cfg)
    config_path = os.path.join(run_dir, RUN_CONFIG)
    old_yaml = Path(config_path).read_text(encoding="utf-8", errors="replace") if os.path.isfile(config_path) else None
    if old_yaml is not None and old_yaml != new_yaml:
        users = [s for s in segments if s.get("config") == RUN_CONFIG]
        kept = f"config.{segments.index(users[0]) if users else len(segments)}.yaml"
        atomic.write_text(os.path.join(run_dir, kept), old_yaml)
        for segment in users:
            segment["config"] = kept
        changes = config_changes(OmegaConf.to_container(OmegaConf.create(old_yaml)), OmegaConf.to_container(cfg))
        if changes:
            log.warning(
                "the config differs from the previous segment's (%s); that one is kept as %s", describe(changes), kept
            )
    segments.append(
        {
            "from_step": int(state.get("step", 0)),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "resumed_from": checkpoint and os.path.abspath(checkpoint),
            "config": RUN_CONFIG,
        }
    )
    atomic.write_json(os.path.join(run_dir, MARKER), {"run_id": run_id, "segments": segments})
    atomic.write_text(config_path, new_yaml)
    return run_id


def read_json(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return json.load(f)
