"""Ops acting on each channel alone: activations, dropout, pooling, resampling, padding.

Their output carries the input's channels on the same axes and they hold nothing per channel
(PReLU with one slope per channel excepted), so removal keeps them as they are.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dagprune.ops.flop_counting import no_flops
from dagprune.ops.channel_map import axis_atoms, barrier_all, first_tensor_index, operand_layout
from dagprune.ops.layers import InterpolateOp, PadOp, PoolOp
from dagprune.ops.padding import SamePad2d
from dagprune.ops.slicing import kept_count, slice_per_channel_state, unchanged_removal
from dagprune.ops.spec import OpSpec
from dagprune.ops.specs.normalization import pass_through_coupling
from dagprune.ops.stochastic_depth import StochasticDepth

__all__ = ["SPECS", "last_axis_pass_through_coupling"]

ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Softshrink, nn.Hardshrink, nn.Threshold,
    nn.RReLU,
)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout, StochasticDepth)
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
         nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.LPPool3d)
RESAMPLING = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
PADDINGS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
            nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
            nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
            nn.CircularPad2d, nn.CircularPad3d, SamePad2d)


def last_axis_pass_through_coupling(ctx, vertex, module, layouts, values, output):
    """Functions that move or resample the positions of every axis but the last of their first
    tensor argument, each channel on its own, and return a tensor with the same last axis
    (channels-last window merging, position-embedding resampling): the output's last axis
    carries the input's last-axis channels. Channels on any other axis, or in any other
    argument, are barriers."""
    first = first_tensor_index(values)
    if first is None or not isinstance(output, torch.Tensor) or output.ndim == 0:
        return barrier_all(ctx, layouts, "no tensor in and out")
    last = values[first].ndim - 1
    atoms = axis_atoms(ctx, operand_layout(ctx, vertex, layouts, first), last, "moves the positions of axis {axis}")
    if atoms is None:
        return None
    if output.shape[-1] != values[first].shape[-1]:
        return barrier_all(ctx, {last: atoms}, "changes the last axis's size")
    return {output.ndim - 1: atoms}


def remove_from_prelu(module, input_masks, output_mask, shapes):
    """A PReLU with one slope per channel loses the removed channels' slopes."""
    if module.num_parameters == 1:
        return copy.deepcopy(module)
    mask = output_mask.get(1)
    module = slice_per_channel_state(module, mask)
    module.num_parameters = kept_count(mask, module.num_parameters)
    return module


def _example(*layers: nn.Module):
    def example():
        model = nn.Sequential(nn.Conv2d(3, 8, 1), *layers, nn.Conv2d(8, 4, 1))
        return model, (torch.randn(1, 3, 8, 8),)
    return example


def _spec(name, targets, example, removal=unchanged_removal):
    return OpSpec(name, targets, flops=no_flops, coupling=pass_through_coupling, removal=removal,
                  example=example)


SPECS = (
    _spec("activation", ACTIVATIONS, _example(nn.Hardswish())),
    _spec("dropout", DROPOUTS, _example(nn.Dropout2d(0.1))),
    _spec("pooling", POOLS + (PoolOp,), _example(nn.MaxPool2d(2))),
    _spec("resampling", RESAMPLING + (InterpolateOp,), _example(nn.Upsample(scale_factor=2))),
    _spec("padding", PADDINGS + (PadOp,), _example(nn.ZeroPad2d(1))),
    _spec("prelu", (nn.PReLU,), _example(nn.PReLU(8)), removal=remove_from_prelu),
)
