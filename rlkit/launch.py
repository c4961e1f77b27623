"""``hardware.num_procs=N``: the same ``rlkit train`` job as N data-parallel processes on
this machine, started by ``torch.distributed.run`` (torchrun) and waited for."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from rlkit.checkpoint import list_checkpoints
from rlkit.preemption import ignore_signals, restore_signals


def needs_launch(cfg) -> bool:
    """More processes asked for, and no launcher (torchrun, deepspeed, srun script) started us as one of many."""
    return cfg.hardware.num_procs > 1 and "WORLD_SIZE" not in os.environ


def launch(cfg, run_dir: str, overrides: list[str]) -> int:
    """Run the job's overrides as ``num_procs`` processes; returns torchrun's exit code.

    Every rank must agree on the run dir: it is passed explicitly, so a multirun job's
    processes also write into its sweep subdirectory. The preemption signals are ignored
    here and in torchrun's agent (a signal would otherwise kill it); the workers handle them.
    torchrun runs in a session of its own (Ctrl-C in a terminal reaches only this process), and a
    stop signal sent here (``kill``, Ctrl-C) is passed on to the workers, which checkpoint at the
    next step and stop; this process then returns 128 + the signal unless the run finished.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={cfg.hardware.num_procs}",
        "-m",
        "rlkit.cli",
        "train",
        *overrides,
        f"hydra.run.dir='{run_dir}'",
    ]
    previous = ignore_signals(list(cfg.trainer.preempt_signals))
    stopped: list[int] = []
    try:
        agent = subprocess.Popen(command, start_new_session=True)

        def forward(signum, frame) -> None:
            stopped.append(signum)
            for pid in child_processes(agent.pid) or [agent.pid]:  # the workers; the agent while it starts them
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

        for name in cfg.trainer.stop_signals:
            if name not in cfg.trainer.preempt_signals:
                previous[name] = signal.signal(signal.Signals[name], forward)
        code = agent.wait()
    finally:
        restore_signals(previous)
    return 128 + stopped[0] if stopped and not finished(run_dir, cfg.trainer.max_steps) else code


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    children = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                children.append(int(entry))
    return children


def finished(run_dir: str, max_steps: int) -> bool:
    """The run reached its last step (that step always writes a checkpoint)."""
    found = list_checkpoints(run_dir)
    return bool(found) and os.path.basename(found[-1]) == str(max_steps)
