"""One optimizer step over a minibatch split into micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def optimizer_step(engine, micro_batches: Sequence, loss_fn: Callable) -> float:
    """Backward every micro-batch, then step once (DeepSpeed steps at the last).

    ``loss_fn(micro_batch)`` must return the micro-batch's share of the minibatch
    loss, normalised by *global* minibatch counts, so gradients add up to exactly
    the minibatch loss's gradient whatever the micro-batch size or process count
    (hence ``scale_wrt_gas=False``: DeepSpeed must not divide again). Returns the
    gradient norm before clipping.
    """
    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise ValueError(
            f"{len(micro_batches)} micro-batches for an engine built for {engine.gradient_accumulation_steps()}"
        )
    norm = None
    for index, micro_batch in enumerate(micro_batches):
        loss = loss_fn(micro_batch) * engine.dp_world_size  # DeepSpeed averages gradients over processes
        engine.backward(loss, scale_wrt_gas=False)
        if index == len(micro_batches) - 1 and engine.zero_optimization_stage() == 0:
            norm = gradient_norm(engine.module)  # DeepSpeed keeps no norm for a plain torch optimizer
        engine.step()
    if norm is None:
        norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def gradient_norm(model) -> float:
    """L2 norm of all (already reduced) gradients."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def split_micro_batches(size: int, num_micro_batches: int) -> list[torch.Tensor]:
    """Row indices of ``size`` rows split into ``num_micro_batches`` near-equal parts."""
    return list(torch.arange(size).tensor_split(num_micro_batches))
