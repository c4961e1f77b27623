"""Preemption and time limits on SLURM.

SLURM signals a job shortly before its time limit (``sbatch --signal=USR1@120``) or before
preempting it. On one of ``trainer.preempt_signals`` each rank notes the signal; at the next
step boundary the ranks agree, save a checkpoint, ask SLURM to requeue the job and exit. The
requeued job runs the same command, which resumes from that checkpoint (``resume=auto``) with
the same data position, RNG state and W&B run id.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from rlkit.engine import all_reduce_sum, is_main_process

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on purpose; the same command resumes the run


class Preempted(Exception):
    """Raised once the preemption checkpoint of ``step`` is saved."""

    def __init__(self, step: int):
        super().__init__(f"preempted after step {step}")
        self.step = step


class PreemptionWatch:
    """Notes the configured signals; :meth:`requested` is collective (every rank, every step)."""

    def __init__(self, signal_names: list[str]):
        self.received: int | None = None
        for name in signal_names:
            signal.signal(signal.Signals[name], self._note)

    def _note(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        return all_reduce_sum(float(self.received is not None)) > 0


def ignore_signals(signal_names: list[str]) -> dict:
    """Ignore the signals here (and, inherited through exec, in launched children until they set
    their own handlers); returns the previous handlers for :func:`restore_signals`."""
    return {name: signal.signal(signal.Signals[name], signal.SIG_IGN) for name in signal_names}


def restore_signals(previous: dict) -> None:
    for name, handler in previous.items():
        signal.signal(signal.Signals[name], handler)


def requeue_and_exit_code(stop: Preempted) -> int:
    """Ask SLURM to requeue this job (rank 0, when under SLURM); the exit code for this process.

    Under torchrun a worker exits 0 (torchrun reports any other code as a crash); whoever launched
    it sees from the checkpoints that the run is unfinished.
    """
    if is_main_process():
        job = os.environ.get("SLURM_JOB_ID")
        where = "run the same command to resume"
        if job:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            where = (
                f"SLURM job {job} requeued"
                if done.returncode == 0
                else f"scontrol requeue {job} failed: {done.stderr.strip()}"
            )
        print(f"rlkit: {stop}; checkpoint saved; {where}", file=sys.stderr, flush=True)
    return 0 if "TORCHELASTIC_RUN_ID" in os.environ else EXIT_PREEMPTED
