"""The conditionally parameterised convolution (:class:`dagprune.ops.CondConv2d`)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from dagprune.ops.cond_conv import CondConv2d
from dagprune.ops.slicing import kept_count, replace_tensor, slice_tensor
from dagprune.ops.spec import ChannelWeight, OpSpec
from dagprune.ops.specs.convolution import conv_channels

__all__ = ["SPECS"]


def cond_conv_flops(module: CondConv2d, inputs, output) -> int:
    """The convolution with each sample's kernel, and the mixing of the experts' kernels."""
    per_kernel = math.prod(module.kernel_shape)
    convolution = 2 * output.numel() * per_kernel // module.out_channels
    return convolution + 2 * output.shape[0] * module.num_experts * per_kernel


def cond_conv_coupling(ctx, vertex, module, layouts, values, output):
    """Like a convolution (:func:`~.convolution.conv_channels`). The routing weights hold one
    value per expert: their producer keeps them all."""
    ctx.barrier_layout(layouts[1], "routing weights of a CondConv2d (one per expert)")
    return {1: conv_channels(ctx, vertex, module, layouts, cond_conv_flops(module, values, output))}


def remove_from_cond_conv(module, input_masks, output_mask, shapes):
    """Every expert's kernel loses the removed output channels and, in an ungrouped layer, the
    removed input channels (a grouped layer loses whole groups, tied by the coupling)."""
    module = copy.deepcopy(module)
    in_mask, out_mask = input_masks[0].get(1), output_mask.get(1)
    kernels = slice_tensor(module.expert_kernels(), 1, out_mask)
    if module.groups == 1:
        kernels = slice_tensor(kernels, 2, in_mask)
    else:
        module.groups = kept_count(out_mask, module.out_channels) // (module.out_channels // module.groups)
    replace_tensor(module, "weight", kernels.reshape(module.num_experts, -1))
    if module.bias is not None:
        replace_tensor(module, "bias", slice_tensor(module.bias, 1, out_mask))
    module.out_channels = kept_count(out_mask, module.out_channels)
    module.in_channels = kept_count(in_mask, module.in_channels)
    return module


def mask_cond_conv_input(layer: CondConv2d, inputs, mask: torch.Tensor, axis: int) -> torch.Tensor:
    """``layer(x * mask, routing_weights)``."""
    return layer(inputs[0] * mask.view(1, -1, 1, 1), *inputs[1:])


def cond_conv_filters(module: CondConv2d, vertex) -> ChannelWeight:
    """Every expert's filters of an output channel."""
    return ChannelWeight(module.expert_kernels(), 1)


class _Routed(nn.Module):
    """Conv, then a CondConv2d routed by its pooled input, then a 1x1 conv reading it."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.route = nn.Linear(8, 3)
        self.cond = CondConv2d(8, 8, (3, 3), padding=(1, 1), groups=groups, num_experts=3, bias=True)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        routing = torch.sigmoid(self.route(x.mean((2, 3))))
        return self.head(self.cond(x, routing))


SPECS = (
    OpSpec("cond_conv", (CondConv2d,), flops=cond_conv_flops, coupling=cond_conv_coupling,
           removal=remove_from_cond_conv, masking=mask_cond_conv_input, importance=cond_conv_filters,
           example=lambda: (_Routed(), (torch.randn(2, 3, 6, 6),))),
)
