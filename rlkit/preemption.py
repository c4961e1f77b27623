"""Stopping on a signal: preemption and time limits on SLURM, and ``kill`` / Ctrl-C anywhere.

SLURM signals a job shortly before its time limit (``sbatch --signal=USR1@120``) or before
preempting it. On one of ``trainer.preempt_signals`` each rank notes the signal; at the next
step boundary the ranks agree, save a checkpoint, ask SLURM to requeue the job and exit. The
requeued job runs the same command, which resumes from that checkpoint (``resume=auto``) with
the same data position, RNG state and W&B run id.

``trainer.stop_signals`` (SIGTERM and SIGINT: ``kill``, Ctrl-C, Docker, Kubernetes) do the same
without the requeue and exit with 128 + the signal number; the same signal a second time exits
at once (the last checkpoint stays intact: every write is atomic).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from rlkit.engine import all_reduce_sum, is_main_process

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on purpose; the same command resumes the run


class Preempted(Exception):
    """Raised once the checkpoint of ``step`` is saved (or, before the first step, when there is
    nothing to save yet). ``requeue``: a preemption signal, not a stop signal."""

    def __init__(self, step: int, signum: int | None = None, requeue: bool = True):
        where = f"after step {step}" if step else "before the first step"
        super().__init__(f"preempted {where}" if requeue else f"stopped by {signal_name(signum)} {where}")
        self.step, self.signum, self.requeue = step, signum, requeue


def say(line: str) -> None:
    """One line to stderr from a signal handler (unbuffered: a buffered print there can fail
    with a reentrant call when the signal interrupted another write)."""
    os.write(2, (line + "\n").encode())


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a signal"


class PreemptionWatch:
    """Notes the configured signals; :meth:`requested` is collective (every rank, every step).
    A signal in both lists preempts (requeues)."""

    def __init__(self, signal_names: list[str], stop_names: list[str] = ()):
        self.received: int | None = None
        self.requeue = True
        for name in stop_names:
            signal.signal(signal.Signals[name], self._stop)
        for name in signal_names:
            signal.signal(signal.Signals[name], self._note)

    def _note(self, signum, frame) -> None:
        self.received = signum

    def _stop(self, signum, frame) -> None:
        if self.received is not None:
            say(f"rlkit: {signal_name(signum)} after {signal_name(self.received)}: stopping now, without a checkpoint")
            os._exit(128 + signum)
        self.received, self.requeue = signum, False
        if is_main_process():
            say(
                f"rlkit: {signal_name(signum)} received: saving a checkpoint at the end of this step, then stopping "
                "(send it again to stop at once)"
            )

    def requested(self) -> bool:
        return all_reduce_sum(float(self.received is not None)) > 0

    def stop(self, step: int) -> Preempted:
        """The exception to raise at ``step``'s boundary once :meth:`requested` (and the checkpoint saved)."""
        return Preempted(step, self.received, self.requeue)


def ignore_signals(signal_names: list[str]) -> dict:
    """Ignore the signals here (and, inherited through exec, in launched children until they set
    their own handlers); returns the previous handlers for :func:`restore_signals`."""
    return {name: signal.signal(signal.Signals[name], signal.SIG_IGN) for name in signal_names}


def restore_signals(previous: dict) -> None:
    for name, handler in previous.items():
        signal.signal(signal.Signals[name], handler)


def requeue_and_exit_code(stop: Preempted) -> int:
    """Ask SLURM to requeue this job (rank 0, when under SLURM; preemption signals only); the exit
    code for this process: 128 + the signal for a stop signal, else EXIT_PREEMPTED.

    Under torchrun a worker exits 0 (torchrun reports any other code as a crash); whoever launched
    it sees from the checkpoints that the run is unfinished.
    """
    saved = "checkpoint saved" if stop.step else "nothing to save yet"
    if not stop.requeue:
        if is_main_process():
            print(f"rlkit: {stop}; {saved}; run the same command to resume", file=sys.stderr, flush=True)
        return 0 if "TORCHELASTIC_RUN_ID" in os.environ else 128 + (stop.signum or 0)
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
        print(f"rlkit: {stop}; {saved}; {where}", file=sys.stderr, flush=True)
    return 0 if "TORCHELASTIC_RUN_ID" in os.environ else EXIT_PREEMPTED
