"""Reductions (mean, sum, amax, ...) and softmax: channels on the reduced axis are barriers."""

from __future__ import annotations

import torch
from torch import nn

from dagprune.ops.channel_map import argument_value, normalize_dims, tensor_layout
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.reduction import ReductionOp, SoftmaxOp
from dagprune.ops.slicing import unchanged_removal
from dagprune.ops.spec import OpSpec, opaque_coupling

__all__ = ["SPECS"]

_SOFTMAX_LAYERS = (nn.Softmax, nn.LogSoftmax, nn.Softmin)


def reduction_coupling(ctx, vertex, module, layouts, values, output):
    if not isinstance(values[0], torch.Tensor) or not isinstance(output, torch.Tensor):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    x_layout = tensor_layout(layouts[0])
    dims = normalize_dims(argument_value(module, values, 1, "dim"), values[0].ndim)
    keepdim = bool(argument_value(module, values, 2, "keepdim", False))
    result = {}
    for axis, atoms in x_layout.items():
        if axis in dims:
            ctx.barrier(atoms, f"{module.short_name} over a channel axis")
        else:
            result[axis if keepdim else axis - sum(d < axis for d in dims)] = atoms
    return result or None


def softmax_coupling(ctx, vertex, module, layouts, values, output):
    dim = module.dim if isinstance(module, _SOFTMAX_LAYERS) else argument_value(module, values, 1, "dim")
    if dim is None:
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    x_layout = tensor_layout(layouts[0])
    dim %= values[0].ndim
    if dim in x_layout:
        ctx.barrier(x_layout[dim], "softmax over a channel axis")
    return {axis: atoms for axis, atoms in x_layout.items() if axis != dim} or None


class _Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3))).softmax(-1)


SPECS = (
    OpSpec("reduction", (ReductionOp,), flops=no_flops, coupling=reduction_coupling,
           removal=unchanged_removal, example=lambda: (_Pooled(), (torch.randn(1, 3, 4, 4),))),
    OpSpec("softmax", (SoftmaxOp, *_SOFTMAX_LAYERS), flops=no_flops, coupling=softmax_coupling,
           removal=unchanged_removal, example=lambda: (_Pooled(), (torch.randn(1, 3, 4, 4),))),
)
