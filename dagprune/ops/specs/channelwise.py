"""Ops acting on each channel alone: activations, dropout, pooling, resampling, padding.

Their output carries the input's channels on the same axes and they hold nothing per channel
(PReLU with one slope per channel excepted), so removal keeps them as they are.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dagprune.ops.flop_counting import no_flops
from dagprune.ops.channel_map import (argument_input, axis_atoms, barrier_all, first_tensor_index, is_size_layout,
                                      operand_layout, tensor_layout)
from dagprune.ops.layers import InterpolateOp, PoolOp
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
UNPOOLS = (nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d)
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


def pooling_coupling(ctx, vertex, module, layouts, values, output):
    """Pooling passes channels through; a max pool returning its indices
    (``return_indices=True``) gives the values and the indices the same channels."""
    layout = pass_through_coupling(ctx, vertex, module, layouts, values, output)
    if isinstance(output, tuple):
        return tuple(None if layout is None else dict(layout) for _ in output)
    return layout


def unpooling_coupling(ctx, vertex, module, layouts, values, output):
    """Max unpooling (``nn.MaxUnpool2d``, ``F.max_unpool2d``) places each channel's values at
    that channel's own indices (positions within its plane): the values' and the indices'
    channels are the same, and the output carries them. An ``output_size`` read from a tensor's
    size counts only its spatial entries, so it reads channel sizes harmlessly; any other
    operand carrying channels is a barrier."""
    x_index, indices_index = ((0, 1) if isinstance(module, UNPOOLS) else
                              (argument_input(module, 0, "input"), argument_input(module, 1, "indices")))
    if x_index is None or indices_index is None:
        return barrier_all(ctx, layouts, "unpooling with constant values or indices")
    for index, other in enumerate(layouts):
        if index not in (x_index, indices_index) and not is_size_layout(other):
            ctx.barrier_layout(other, f"extra operand of vertex {vertex.name}")
    layout, indices = tensor_layout(layouts[x_index]), tensor_layout(layouts[indices_index])
    for axis in set(layout) | set(indices):
        if axis in layout and axis in indices:
            ctx.unify(layout[axis], indices[axis])
        else:
            ctx.barrier(layout.get(axis, indices.get(axis)), "unpooled without its indices' channels")
    return {axis: atoms for axis, atoms in layout.items() if axis in indices} or None


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


class _SegNetStage(nn.Module):
    """An encoder conv, a max pool keeping its indices, a decoder conv, unpooling at them."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.encode, self.decode, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)
        self.pool, self.unpool = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)

    def forward(self, x):
        features = self.encode(x)
        pooled, indices = self.pool(features)
        decoded = torch.relu(self.decode(pooled))
        if self.functional:
            return self.out(F.max_unpool2d(decoded, indices, 2, output_size=features.size()))
        return self.out(self.unpool(decoded, indices))


def _unpooling_example():
    return _SegNetStage(), (torch.randn(1, 3, 8, 8),)


def _functional_unpooling_example():
    return _SegNetStage(functional=True), (torch.randn(1, 3, 8, 8),)


def grid_sample_coupling(ctx, vertex, module, layouts, values, output):
    """``F.grid_sample(x, grid)`` samples every channel of ``x`` (axis 1) at the grid's points:
    those channels pass; channels on ``x``'s moved axes or in the grid are barriers."""
    x_index, grid_index = argument_input(module, 0, "input"), argument_input(module, 1, "grid")
    if x_index is None or grid_index is None:
        return barrier_all(ctx, layouts, "grid_sample of a constant input or grid")
    ctx.barrier_layout(layouts[grid_index], "the sampling grid of grid_sample")
    layout = tensor_layout(layouts[x_index])
    for axis, atoms in layout.items():
        if axis != 1:
            ctx.barrier(atoms, f"grid_sample moves the positions of axis {axis}")
    return {1: layout[1]} if 1 in layout else None


class _Warp(nn.Module):
    """A feature map resampled at a shifted grid (spatial transformers, deformable alignment)."""

    def __init__(self):
        super().__init__()
        self.encode, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)
        self.register_buffer("theta", torch.tensor([[[1.0, 0.0, 0.1], [0.0, 0.9, 0.0]]]))

    def forward(self, x):
        grid = F.affine_grid(self.theta.expand(x.shape[0], -1, -1), [x.shape[0], 1, 6, 6], align_corners=False)
        return self.out(F.grid_sample(self.encode(x), grid, align_corners=False))


def _spec(name, targets, example, removal=unchanged_removal, coupling=pass_through_coupling, **facets):
    return OpSpec(name, targets, flops=no_flops, coupling=coupling, removal=removal, example=example, **facets)


SPECS = (
    _spec("activation", ACTIVATIONS, _example(nn.Hardswish())),
    _spec("dropout", DROPOUTS, _example(nn.Dropout2d(0.1))),
    _spec("pooling", POOLS + (PoolOp,), _example(nn.MaxPool2d(2)), coupling=pooling_coupling),
    _spec("unpooling", UNPOOLS, _unpooling_example, coupling=unpooling_coupling, reads_sizes=True),
    _spec("functional_unpooling", tuple(f"torch.nn.functional.max_unpool{n}d" for n in (1, 2, 3)),
          _functional_unpooling_example, coupling=unpooling_coupling, reads_sizes=True),
    _spec("resampling", RESAMPLING + (InterpolateOp,), _example(nn.Upsample(scale_factor=2))),
    _spec("padding", PADDINGS, _example(nn.ZeroPad2d(1))),
    _spec("grid_sample", ("torch.nn.functional.grid_sample", "torch.grid_sampler"),
          lambda: (_Warp(), (torch.randn(2, 3, 8, 8),)), coupling=grid_sample_coupling),
    _spec("prelu", (nn.PReLU,), _example(nn.PReLU(8)), removal=remove_from_prelu),
)
