"""Convolutions: nn.Conv*d, nn.ConvTranspose*d, timm's weight-standardised conv (F.conv*d with
weights read in the graph: :mod:`dagprune.ops.specs.functional_conv`)."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from dagprune.ops.channel_map import (along_axis, channel_atoms, same_in_every_row, tensor_layout,
                                      tie_positions_across_groups, whole_in_every_row)
from dagprune.ops.flop_counting import measured_flops
from dagprune.ops.layers import FunctionalLayerOp
from dagprune.ops.slicing import kept_count, replace_tensor, slice_tensor
from dagprune.ops.spec import ChannelWeight, OpSpec, opaque_coupling
from dagprune.ops.standardized_conv import StandardizedConv2d

__all__ = ["SPECS"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# ------------------------------------------------------------------------------- flops
def conv_flops(module: nn.Conv2d, inputs, output) -> int:
    return 2 * output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def conv_transpose_flops(module: nn.ConvTranspose2d, inputs, output) -> int:
    kernel = math.prod(module.kernel_size)
    return 2 * inputs[0].numel() * (module.out_channels // module.groups) * kernel


# ------------------------------------------------------------------------------- coupling
def _tie_conv_groups(ctx, in_atoms, out_atoms, module) -> None:
    """A whole conv group (its input and output channels) is kept or removed together."""
    groups = module.groups
    in_per_group = module.in_channels // groups
    out_per_group = module.out_channels // groups
    if len(in_atoms) != groups * in_per_group or len(out_atoms) != groups * out_per_group:
        for group in range(groups):
            ctx.tie(np.concatenate([in_atoms[group * in_per_group:(group + 1) * in_per_group],
                                    out_atoms[group * out_per_group:(group + 1) * out_per_group]]))
        return
    # one row per conv group, tied in one call (a depthwise conv has thousands of groups)
    members = np.concatenate([np.asarray(in_atoms).reshape(groups, in_per_group),
                              np.asarray(out_atoms).reshape(groups, out_per_group)], axis=1)
    if members.shape[1] > 1:
        ctx.unify(members[:, 1:], np.repeat(members[:, :1], members.shape[1] - 1, axis=1))


def _grouped_conv_rule(ctx, vertex, module, in_atoms, out_atoms, flops: int):
    """The choice for a grouped convolution with several channels per group on both sides, once
    the rest of the model has recorded its unions: where the model ties each channel position
    across the conv's groups on either side (ResNeSt's split attention reshapes the output to
    ``(radix, C)``), every group keeps the same input and output positions (the groups stay).
    Otherwise the finer of the two: the same positions when each group holds more channels on
    both sides than there are groups (2 groups of 64 inputs and 256 outputs: 64 and 256
    classes instead of 2), else whole groups (input and output channels of a group together)."""
    in_rows = np.asarray(in_atoms).reshape(module.groups, -1)
    out_rows = np.asarray(out_atoms).reshape(module.groups, -1)
    positions_finer = min(in_rows.shape[1], out_rows.shape[1]) > module.groups

    def rule(class_of) -> None:
        out_classes, in_classes = class_of(out_rows), class_of(in_rows)
        tied = same_in_every_row(out_classes) or same_in_every_row(in_classes)
        if tied or (positions_finer and not whole_in_every_row(out_classes)
                    and not whole_in_every_row(in_classes)):
            tie_positions_across_groups(ctx, in_rows)
            tie_positions_across_groups(ctx, out_rows)
            ctx.consume(vertex, 0, 1, in_atoms)
            ctx.count_flops(vertex, flops, [out_atoms, in_atoms])
        else:
            _tie_conv_groups(ctx, in_atoms, out_atoms, module)
            ctx.count_flops(vertex, flops, [out_atoms])
    return rule


def conv_channels(ctx, vertex, module, layouts, flops: int, positions_allowed: bool = False) -> np.ndarray:
    """A convolution's channels (``module`` has ``in_channels``, ``out_channels`` and
    ``groups``; input 0 holds them on axis 1), and its ``flops``, scaled by the kept fractions:
    output channels are new; input channels are consumed, or tied per conv group (with
    ``positions_allowed``, a layer with several channels per group keeps the same positions in
    every group where the model ties them so, see :func:`_grouped_conv_rule`). Returns the
    output atoms."""
    in_atoms = channel_atoms(ctx, tensor_layout(layouts[0]),
                             "convolution over a channel-tracked spatial axis")
    out_atoms = ctx.produce(module.out_channels, axis=1)
    if module.groups == 1:
        if in_atoms is not None:
            ctx.consume(vertex, 0, 1, in_atoms)
        ctx.count_flops(vertex, flops, [out_atoms] + ([in_atoms] if in_atoms is not None else []))
        return out_atoms
    several_per_group = min(module.in_channels, module.out_channels) > module.groups
    if in_atoms is None:
        ctx.barrier(out_atoms, "grouped convolution of an untracked input")
    elif positions_allowed and several_per_group and len(in_atoms) == module.in_channels:
        ctx.defer(_grouped_conv_rule(ctx, vertex, module, in_atoms, out_atoms, flops), stage=0)
        return out_atoms
    else:
        _tie_conv_groups(ctx, in_atoms, out_atoms, module)
    ctx.count_flops(vertex, flops, [out_atoms])
    return out_atoms


def conv_coupling(ctx, vertex, module, layouts, values, output):
    """Output channels are new; input channels are consumed (or tied per conv group)."""
    flops = (conv_transpose_flops if isinstance(module, _TRANSPOSED) else conv_flops)(module, values, output)
    positions_allowed = type(module) in _CONVS or type(module) is StandardizedConv2d
    return {1: conv_channels(ctx, vertex, module, layouts, flops, positions_allowed=positions_allowed)}


# ------------------------------------------------------------------------------- removal
def _slice_extra_output_state(module: nn.Module, out_channels: int, out_mask) -> None:
    """Per-output-channel tensors of conv subclasses (e.g. timm's weight-standardised convs
    keep a ``gain`` of shape (out, 1, 1, 1))."""
    if out_mask is None:
        return
    named = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    for name, tensor in named:
        if name not in ("weight", "bias") and tensor is not None and tensor.ndim >= 1 \
                and tensor.shape[0] == out_channels:
            replace_tensor(module, name, slice_tensor(tensor, 0, out_mask))


def _remove_from_conv(module, in_mask, out_mask, transposed: bool):
    """Slices weight, bias and per-channel state. The weight's axis 0 holds every output
    channel (every input channel when ``transposed``); its axis 1 the channels of one conv
    group on the other side, sliced when there is a single group or when every group keeps the
    same positions (otherwise whole groups go, tied by the coupling)."""
    module = copy.deepcopy(module)
    full_mask, grouped_mask = (in_mask, out_mask) if transposed else (out_mask, in_mask)
    weight = slice_tensor(module.weight, 0, full_mask)
    if module.groups == 1:
        weight = slice_tensor(weight, 1, grouped_mask)
    elif _same_positions_in_every_group(full_mask, module.groups) and \
            _same_positions_in_every_group(grouped_mask, module.groups):  # the groups stay
        weight = slice_tensor(weight, 1, None if grouped_mask is None else grouped_mask.reshape(module.groups, -1)[0])
    else:
        full_size = module.in_channels if transposed else module.out_channels
        module.groups = kept_count(full_mask, full_size) // (full_size // module.groups)
    replace_tensor(module, "weight", weight)
    if module.bias is not None:
        replace_tensor(module, "bias", slice_tensor(module.bias, 0, out_mask))
    _slice_extra_output_state(module, module.out_channels, out_mask)
    module.out_channels = kept_count(out_mask, module.out_channels)
    module.in_channels = kept_count(in_mask, module.in_channels)
    return module


def _same_positions_in_every_group(mask, groups: int) -> bool:
    return mask is None or same_in_every_row(np.asarray(mask).reshape(groups, -1))


def remove_from_conv(module, input_masks, output_mask, shapes):
    return _remove_from_conv(module, input_masks[0].get(1), output_mask.get(1), transposed=False)


def remove_from_conv_transpose(module, input_masks, output_mask, shapes):
    return _remove_from_conv(module, input_masks[0].get(1), output_mask.get(1), transposed=True)


def remove_from_standardized_conv(module, input_masks, output_mask, shapes):
    """Output channels (and whole conv groups) go without changing any kept filter's
    statistics; removing some input channels of a group (of an ungrouped layer, or the same
    positions in every group) would, so that layer becomes a plain conv holding the
    standardised weight, sliced."""
    in_mask = input_masks[0].get(1)
    if in_mask is not None and not whole_in_every_row(np.asarray(in_mask).reshape(module.groups, -1)):
        module = module.to_plain_conv()
    return remove_from_conv(module, input_masks, output_mask, shapes)


# ------------------------------------------------------------------------------- masking
def _conv_weight_mask(conv: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The factor on ``conv.weight`` (out, in / groups, *kernel) equal to masking the conv's
    input channels with ``mask``: output channel ``o`` of conv group ``g`` reads input channel
    ``g * in_per_group + j`` through ``weight[o, j]`` (depthwise convs included)."""
    groups, kernel_axes = conv.groups, [1] * (conv.weight.ndim - 2)
    if groups == 1:
        return mask.view(1, -1, *kernel_axes)
    in_per_group, out_per_group = conv.in_channels // groups, conv.out_channels // groups
    per_output = mask.view(groups, 1, in_per_group).expand(groups, out_per_group, in_per_group)
    return per_output.reshape(conv.out_channels, in_per_group, *kernel_axes)


def mask_conv_input(conv: nn.Conv2d, inputs, mask: torch.Tensor, axis: int) -> torch.Tensor:
    """``conv(x * mask)``, computed by scaling whichever is smaller: the input or the weight."""
    x = inputs[0]
    if x.numel() <= conv.weight.numel() or type(conv) not in _CONVS:  # a subclass's own forward
        return conv(x * along_axis(mask, 1, x.ndim))
    return conv._conv_forward(x, conv.weight * _conv_weight_mask(conv, mask), conv.bias)


# ------------------------------------------------------------------------------- importance
def conv_filters(module, vertex) -> ChannelWeight:
    return ChannelWeight(module.weight, 0)


def conv_transpose_filters(module, vertex) -> ChannelWeight:
    return ChannelWeight(module.weight, 1)


def _conv_example():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 4, 1)), \
        (torch.randn(1, 3, 9, 9),)


def _conv_transpose_example():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 6, 2, stride=2),
                         nn.Conv2d(6, 4, 1)), (torch.randn(1, 3, 6, 6),)


def _standardized_conv_example():
    return nn.Sequential(nn.Conv2d(3, 8, 1), StandardizedConv2d(8, 8, 3, padding=1),
                         StandardizedConv2d(8, 4, 1, groups=2)), (torch.randn(1, 3, 5, 5),)


SPECS = (
    OpSpec("conv", _CONVS, flops=conv_flops, coupling=conv_coupling, removal=remove_from_conv,
           masking=mask_conv_input, importance=conv_filters, example=_conv_example),
    OpSpec("conv_transpose", _TRANSPOSED, flops=conv_transpose_flops, coupling=conv_coupling,
           removal=remove_from_conv_transpose, importance=conv_transpose_filters,
           example=_conv_transpose_example),
    # its forward standardises the weight: scaling the weight by a mask would change that
    OpSpec("standardized_conv", (StandardizedConv2d,), flops=conv_flops, coupling=conv_coupling,
           removal=remove_from_standardized_conv, importance=conv_filters,
           example=_standardized_conv_example),
    OpSpec("functional_layer", (FunctionalLayerOp,), flops=measured_flops, coupling=opaque_coupling),
    OpSpec("functional_conv_transpose", ("torch.nn.functional.conv_transpose1d",
                                         "torch.nn.functional.conv_transpose2d"),
           flops=measured_flops, coupling=opaque_coupling),
)
