"""One optimizer step over a minibatch split into micro-batches, skipped when a number is not finite."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from rlkit.engine.distributed import all_reduce_sum


@dataclasses.dataclass
class SkippedSteps:
    """Optimizer steps skipped because the loss or the gradient norm was not finite: in all and
    in a row (the trainer logs ``train/skipped_steps`` and stops after too many in a row)."""

    total: int = 0
    consecutive: int = 0
    reason: str = ""  # of the last skip

    def record(self, reason: str | None) -> None:
        """One optimizer step: skipped for ``reason``, or applied (None)."""
        self.total += reason is not None
        self.consecutive = self.consecutive + 1 if reason is not None else 0
        self.reason = reason or self.reason

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])


SKIPPED = SkippedSteps()  # of this process; every rank skips the same steps


def optimizer_step(engine, micro_batches: Sequence, loss_fn: Callable) -> float:
    """Backward every micro-batch, then step once (DeepSpeed steps at the last).

    ``loss_fn(micro_batch)`` must return the micro-batch's share of the minibatch
    loss, normalised by *global* minibatch counts, so gradients add up to exactly
    the minibatch loss's gradient whatever the micro-batch size or process count
    (hence ``scale_wrt_gas=False``: DeepSpeed must not divide again). Returns the
    gradient norm before clipping.

    A non-finite loss (on any rank) or gradient norm skips the update: no parameter, optimizer
    moment or LR-schedule change, the gradients dropped, counted in :data:`SKIPPED`.
    """
    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise ValueError(
            f"{len(micro_batches)} micro-batches for an engine built for {engine.gradient_accumulation_steps()}"
        )
    norm, finite_loss = None, True
    for index, micro_batch in enumerate(micro_batches):
        loss = loss_fn(micro_batch) * engine.dp_world_size  # DeepSpeed averages gradients over processes
        finite_loss = finite_loss and bool(torch.isfinite(loss.detach()).all())
        last = index == len(micro_batches) - 1
        if last and all_reduce_sum(float(not finite_loss)):
            loss = loss * float("nan")  # non-finite gradients on every rank: DeepSpeed's overflow check skips them
        engine.backward(loss, scale_wrt_gas=False)
        if last and engine.zero_optimization_stage() == 0:
            norm = gradient_norm(engine.module)  # DeepSpeed keeps no norm for a plain torch optimizer
            if not math.isfinite(norm) and not hasattr(engine.optimizer, "overflow"):
                with dropped_update(engine.optimizer, engine.module):
                    engine.step()
                continue
        engine.step()
    if norm is None:
        norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else float("nan")
    applied = engine.was_step_applied()
    SKIPPED.record(None if applied else "non-finite loss" if not finite_loss else f"gradient norm {norm}")
    return norm


@contextlib.contextmanager
def dropped_update(optimizer, model):
    """Make DeepSpeed skip the update of a plain torch optimizer as it skips an fp16 overflow:
    the gradients zeroed, ``optimizer.step`` a no-op, and an ``overflow`` flag, on which the engine
    counts the step as skipped (``engine.skipped_steps``) and leaves the LR schedule where it is.
    ZeRO stages 1-3 and DeepSpeed's mixed-precision optimizers detect non-finite gradients themselves."""
    own_step = optimizer.__dict__.get("step")  # the LR scheduler's wrapper, if any
    for parameter in model.parameters():
        if parameter.grad is not None:
            parameter.grad.zero_()
    optimizer.step = lambda *args, **kwargs: None
    optimizer.overflow = True
    try:
        yield
    finally:
        del optimizer.overflow
        if own_step is None:
            del optimizer.step
        else:
            optimizer.step = own_step


def gradient_norm(model) -> float:
    """L2 norm of all (already reduced) gradients."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def split_micro_batches(size: int, num_micro_batches: int) -> list[torch.Tensor]:
    """Row indices of ``size`` rows split into ``num_micro_batches`` near-equal parts."""
    return list(torch.arange(size).tensor_split(num_micro_batches))
