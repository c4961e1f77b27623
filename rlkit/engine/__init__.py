"""DeepSpeed set-up: process group, engine, and the ranks' view of the world."""

from rlkit.engine.deepspeed_engine import build_engine, lr_lambda
from rlkit.engine.distributed import (
    all_gather_objects,
    all_reduce_sum,
    barrier,
    init_distributed,
    is_main_process,
    is_partitioned,
    is_sharded,
    mean_over_ranks,
    rank,
    world_size,
)
from rlkit.engine.step import optimizer_step, split_micro_batches

__all__ = [
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "build_engine",
    "init_distributed",
    "is_main_process",
    "is_partitioned",
    "is_sharded",
    "lr_lambda",
    "mean_over_ranks",
    "optimizer_step",
    "split_micro_batches",
    "rank",
    "world_size",
]
