"""``hardware.deterministic``: the same numbers for the same seed, whatever else the machine is doing.

On CPU the kernel that broke this is PyTorch's ``index_put_`` with ``accumulate=True``, the backward
of a gather that repeats rows (here the prompt KV cache shared by a group's samples,
:func:`rlkit.rollout.logprobs.response_logits`): from 32,768 elements on and with more than one thread
it adds in parallel with atomic float adds, so the order of the additions, hence the rounding,
follows the threads' timing. PyTorch's deterministic algorithms make it add serially, which on
2 threads took less time than the atomic adds (docs/reproducibility.md has the evidence and the cost).
"""

from __future__ import annotations

import os

import torch
import torch.utils.deterministic

# cuBLAS is deterministic only with a fixed workspace per stream (CUDA docs, "Results reproducibility")
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def deterministic_enabled(hardware) -> bool:
    """``hardware.deterministic``, where null means on for CPU and off for CUDA."""
    return hardware.device == "cpu" if hardware.deterministic is None else bool(hardware.deterministic)


def use_deterministic_algorithms(hardware) -> bool:
    """Switch PyTorch's deterministic algorithms on or off for this process as ``hardware`` says (before
    the first CUDA matrix product: cuBLAS reads its workspace setting once). An op with no deterministic
    implementation warns once instead of failing the run. Returns whether they are on."""
    enabled = deterministic_enabled(hardware)
    if enabled and hardware.device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    # PyTorch would also fill every torch.empty with NaN, which only matters to code reading memory it never
    # wrote (rlkit's one torch.empty, the decoding KV buffers, is written or zeroed whole); it cost 4% of a
    # 25m model's update on CPU
    torch.utils.deterministic.fill_uninitialized_memory = False
    return enabled
