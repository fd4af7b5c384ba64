"""Functional convolutions, ``F.conv1d/2d/3d`` (and ``torch.conv*d``), whose weight (and bias)
are parameters or buffers read in the graph: a hand-written layer, timm's BlurPool (a fixed
depthwise filter).

With one group the weight's rows are the output channels (produced here, sliced with the
weight) and its axis 1 the input channels (consumed: the gated model masks the input). A
depthwise call (as many groups as input and output channels, one filter per channel) ties each
channel with its filter and its output channel, and its ``groups`` follows removal. Weights
computed by other ops, other grouped calls and channels on kernel or spatial axes are opaque.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dagprune.ops.channel_map import argument_input, argument_value, tensor_layout
from dagprune.ops.parameter import ParameterOp
from dagprune.ops.slicing import kept_count
from dagprune.ops.spec import OpSpec, opaque_coupling

__all__ = ["SPECS"]

_GROUPS = (6, "groups")


def functional_conv_flops(module, inputs, output) -> int:
    weight = argument_value(module, inputs, 1, "weight")
    return 2 * output.numel() * math.prod(weight.shape[1:])


def _operands(vertex, module) -> tuple | None:
    """Input indices of x, weight and bias (None without one), when the weight and bias are
    parameters or buffers read in the graph; else None."""
    x, weight, bias = (argument_input(module, position, keyword)
                       for position, keyword in ((0, "input"), (1, "weight"), (2, "bias")))
    if x is None or weight is None:
        return None
    read = [vertex.predecessors[i].module for i in (weight, bias) if i is not None]
    return (x, weight, bias) if all(isinstance(op, ParameterOp) for op in read) else None


def functional_conv_coupling(ctx, vertex, module, layouts, values, output):
    """See the module docstring."""
    operands, groups = _operands(vertex, module), argument_value(module, values, *_GROUPS, 1)
    if operands is None or not isinstance(groups, int):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    x_index, w_index, b_index = operands
    x, w = tensor_layout(layouts[x_index]), tensor_layout(layouts[w_index])
    bias = tensor_layout(layouts[b_index]).get(0) if b_index is not None else None
    for layout, allowed in ((x, 1), (w, 1)):
        for axis in [a for a in layout if a > allowed]:
            ctx.barrier(layout[axis], "a convolution's spatial or kernel axis")
    flops = functional_conv_flops(module, values, output)
    depthwise = groups == values[x_index].shape[1] == output.shape[1] and values[w_index].shape[1] == 1
    if groups == 1:
        out, x_atoms = w.get(0), x.get(1)
        if x_atoms is not None and w.get(1) is not None:
            ctx.unify(x_atoms, w[1])
            ctx.consume(vertex, x_index, 1, x_atoms)
        elif x_atoms is not None:
            ctx.barrier(x_atoms, "convolution weight without input channels")
            x_atoms = None
        if out is not None:
            ctx.mark_producer(out, 1)
    elif depthwise and x.get(1) is not None and w.get(0) is not None:
        ctx.unify(x[1], w[0])
        out, x_atoms = x[1], None
    else:
        ctx.barrier_layout(layouts, "a grouped functional convolution")
        return None
    if bias is not None and out is not None:
        ctx.unify(bias, out)
    ctx.count_flops(vertex, flops, [atoms for atoms in (out, x_atoms) if atoms is not None])
    return None if out is None else {1: out}


def remove_from_functional_conv(module, input_masks, output_mask, shapes):
    """The weight and bias are sliced where they are read; a depthwise call keeps one group per
    kept channel."""
    module = copy.deepcopy(module)
    groups = module.argument(*_GROUPS)
    if isinstance(groups, int) and groups > 1:
        module.set_argument(*_GROUPS, kept_count(output_mask.get(1), groups))
    return module


class _BlurredProjection(nn.Module):
    """A conv, a fixed depthwise blur (a buffer), and a projection written with F.conv2d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("blur", torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0]))
                             .div(16).expand(8, 1, 3, 3).clone())
        self.weight, self.bias = nn.Parameter(torch.randn(6, 8, 1, 1) / 3), nn.Parameter(torch.randn(6))
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = F.conv2d(F.pad(self.conv(x), [1, 1, 1, 1], mode="reflect"), self.blur, stride=2, groups=8)
        return self.head(torch.relu(F.conv2d(x, self.weight, self.bias)))


SPECS = (
    OpSpec("functional_conv", ("torch.nn.functional.conv1d", "torch.nn.functional.conv2d",
                               "torch.nn.functional.conv3d", "torch.conv1d", "torch.conv2d", "torch.conv3d"),
           flops=functional_conv_flops, coupling=functional_conv_coupling, removal=remove_from_functional_conv,
           example=lambda: (_BlurredProjection(), (torch.randn(2, 3, 8, 8),))),
)
