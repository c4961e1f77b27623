"""Linear layers computed by oneDNN on CPU.

PyTorch's CPU ``nn.Linear`` calls the BLAS it was built with (MKL). oneDNN, which PyTorch
also ships, runs the same float32 and bfloat16 products 15-40% faster on the machines
measured in ``docs/performance.md``, and faster still with its weights reordered once into
its blocked layout, which pays off when a weight is reused many times without changing:
the decoding steps of one rollout. Results equal ``nn.Linear``'s to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

# Below about 256 x 256 weights oneDNN's per-call overhead outweighs its faster kernels (measured on
# 2 cores: a 64 x 64 layer takes 2x as long, a 512 x 512 one 13-26% less), so such layers stay on torch.
MIN_WEIGHT_ELEMENTS = 1 << 16


def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes this CPU's oneDNN linear computes (none in a PyTorch built without oneDNN): float32,
    and bfloat16 only with native bf16 instructions (AVX-512 BF16, AMX). Without them oneDNN has no
    bf16 kernel for the op and fails (seen on an AVX2-only CPU), where torch's own bf16 matmul works."""
    if not torch.backends.mkldnn.is_available():
        return ()
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN; ``weight`` plain (out, in) or reordered by :func:`packed_weights`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinearFunction(torch.autograd.Function):
    """y = x W^T + b with oneDNN forward and input gradient; the weight gradient
    dY^T X stays on ``torch.mm``, which is the faster of the two for that shape."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_matmul(grad_out, weight.t())
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = flat_grad.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        return grad_x, grad_weight, grad_bias


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) computed by oneDNN; inside
    :func:`packed_weights` it multiplies by a reordered copy of its weight instead."""

    packed_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return onednn_matmul(x, self.packed_weight, self.bias)
        return OneDNNLinearFunction.apply(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module, min_weight_elements: int | None = None) -> int:
    """Make every plain ``nn.Linear`` of a CPU ``model`` in a dtype of :func:`onednn_dtypes` with at least
    ``min_weight_elements`` weights (default :data:`MIN_WEIGHT_ELEMENTS`) a :class:`OneDNNLinear`,
    in place; subclasses such as adapters are left alone. Returns how many were converted."""
    smallest = MIN_WEIGHT_ELEMENTS if min_weight_elements is None else min_weight_elements
    dtypes, converted = onednn_dtypes(), 0
    for module in model.modules():
        if (
            type(module) is nn.Linear
            and module.weight.device.type == "cpu"
            and module.weight.dtype in dtypes
            and module.weight.numel() >= smallest
        ):
            module.__class__ = OneDNNLinear
            converted += 1
    return converted


@contextmanager
def packed_weights(model: nn.Module, rows: int):
    """Within the block (gradient-free only), the model's :class:`OneDNNLinear` layers use
    their weights reordered once for inputs of about ``rows`` rows: one extra copy of those
    weights in memory, dropped on exit. A no-op for models without such layers."""
    if torch.is_grad_enabled():
        raise RuntimeError("packed_weights is for inference: the packed copies carry no gradient")
    layers = [module for module in model.modules() if isinstance(module, OneDNNLinear)]
    try:
        for layer in layers:
            layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), rows)
        yield
    finally:
        for layer in layers:
            layer.packed_weight = None


def fused_projection(layers: Sequence[nn.Linear], rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> torch.cat([layer(x) for layer in layers], -1), for gradient-free use on about ``rows``
    rows (decoding): one product with the layers' weights and biases concatenated once (and, for
    :class:`OneDNNLinear` layers, reordered once for oneDNN). Layers of any other kind (adapters,
    quantised layers) are called one by one."""
    if not all(type(layer) in (nn.Linear, OneDNNLinear) for layer in layers):
        return lambda x: torch.cat([layer(x) for layer in layers], -1)
    weight = torch.cat([layer.weight.detach() for layer in layers]) if len(layers) > 1 else layers[0].weight.detach()
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat(
            [
                layer.bias.detach() if layer.bias is not None else weight.new_zeros(layer.out_features)
                for layer in layers
            ]
        )
    if all(type(layer) is OneDNNLinear for layer in layers):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        return lambda x: onednn_matmul(x, packed, bias)
    return lambda x: F.linear(x, weight, bias)
