"""The process group: one process by itself, or many under deepspeed/torchrun."""

from __future__ import annotations

import importlib
import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str) -> None:
    """Join (or, alone, create) the process group DeepSpeed will use.

    A single process gets the rendezvous variables a launcher would set. On CPU we
    skip DeepSpeed's shared-memory all-reduce kernel: only DeepSpeed-Inference's
    tensor parallelism uses it, and building it costs ~35 s of JIT compile per
    fresh machine.
    """
    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    if device == "cpu":
        # (`import deepspeed.comm.torch as m` would bind the torch package itself)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def is_partitioned(model) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitions (even over one process): only its
    forward, which gathers them, may read their values."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def is_sharded(model) -> bool:
    """Whether ZeRO-3 partitions ``model``'s parameters over the ranks: every rank must then
    run each forward pass together (they gather the parameters), generation included."""
    return world_size() > 1 and is_partitioned(model)


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (just ``[obj]`` alone)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _collective_device() -> torch.device:
    """NCCL reduces only CUDA tensors; gloo only CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(value: float) -> float:
    if world_size() == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return float(tensor.item())


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over processes (one all-reduce)."""
    if world_size() == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    tensor = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return {k: float(v) / world_size() for k, v in zip(keys, tensor.tolist())}
