"""Run logging: Weights & Biases, ``metrics.jsonl`` in the run dir, and a progress bar.
Only the main process logs."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

from rlkit.engine import is_main_process


class PhaseTimer:
    """Wall time of each named phase of one step (``time/<phase>`` metrics)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}": value for name, value in self.seconds.items()}


class RunLogger:
    def __init__(self, logger_cfg, run_dir: str, run_id: str, config: dict[str, Any], resumed: bool):
        self.enabled = is_main_process()
        self.cfg = logger_cfg
        self.run_dir = run_dir
        self._wandb = None
        self._bar = None
        if not self.enabled:
            return
        self._metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if logger_cfg.mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                tags=list(logger_cfg.tags),
                mode=logger_cfg.mode,
                dir=run_dir,
                id=run_id,
                name=os.path.basename(run_dir.rstrip("/")),
                resume="allow" if resumed else None,
                config=config,
                settings=wandb.Settings(init_timeout=90, console="off", silent=True),
            )

    def progress(self, total: int, initial: int, desc: str) -> None:
        if self.enabled and self.cfg.progress_bar:
            self.close_progress()
            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def log(self, metrics: dict[str, Any], step: int, postfix: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in postfix if k in metrics})

    def sync(self) -> None:
        """fsync ``metrics.jsonl`` (before a checkpoint, so a power cut loses no step it holds)."""
        if self.enabled:
            self._metrics_file.flush()
            os.fsync(self._metrics_file.fileno())

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.enabled and self._wandb is not None and rows:
            import wandb

            self._wandb.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        if not self.enabled:
            return
        self.close_progress()
        self._metrics_file.close()
        if self._wandb is not None:
            directory = self._wandb.dir
            self._wandb.finish()
            if self.cfg.mode == "offline":
                print(f"W&B run saved offline; upload with: wandb sync {os.path.dirname(directory)}")
