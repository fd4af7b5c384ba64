"""``F.pad`` / ``torch.constant_pad_nd``: constant padding of trailing axes.

Padding a spatial axis passes the channels through. Padding a channel axis with zeros (the
option-A shortcut of CIFAR ResNets, ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))``, added to
a block with ``2C`` channels) makes new channels: the output axis holds ``before`` new channels,
the input's, then ``after`` new ones, each removable like any other (the sum they meet decides
their group), and removal pads by the kept counts of the new ones. Reflect, replicate and
circular padding of a channel axis copy channels, and negative padding crops them: the axis is
barred.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dagprune.ops.channel_map import argument_input, argument_value, tensor_layout
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.layers import PadOp
from dagprune.ops.spec import OpSpec
from dagprune.ops.specs.normalization import pass_through_coupling

__all__ = ["SPECS"]


def _axis_padding(pad, axis: int, ndim: int) -> tuple[int, int]:
    """``(before, after)`` of ``axis`` in ``F.pad``'s ``pad`` (last axis first)."""
    position = 2 * (ndim - 1 - axis)
    return (pad[position], pad[position + 1]) if position + 1 < len(pad) else (0, 0)


def pad_coupling(ctx, vertex, module, layouts, values, output):
    """See the module docstring. A channel axis the example pads by a size computed at run time
    (a hole in the template) is barred; one it does not pad passes its channels through."""
    x_index, pad = argument_input(module, 0, "input"), argument_value(module, values, 1, "pad")
    template = module.argument(1, "pad")
    if x_index is None or not isinstance(pad, (tuple, list)) or not isinstance(output, torch.Tensor):
        return pass_through_coupling(ctx, vertex, module, layouts, values, output)
    mode = argument_value(module, values, 2, "mode", "constant")
    ndim, result = values[x_index].ndim, {}
    for axis, atoms in tensor_layout(layouts[x_index]).items():
        before, after = _axis_padding(pad, axis, ndim)
        constant = isinstance(template, (tuple, list)) and all(
            type(p) is int for p in _axis_padding(template, axis, ndim))
        if before == after == 0:  # (a channel count cannot follow the input's sizes)
            result[axis] = atoms
        elif not constant:
            ctx.barrier(atoms, "padding of a channel axis computed at run time")
        elif mode == "constant" and before >= 0 and after >= 0:
            result[axis] = np.concatenate([ctx.fresh(before), atoms, ctx.fresh(after)])
        else:
            ctx.barrier(atoms, f"{mode} padding or cropping of a channel axis")
    return result or None


def remove_from_pad(module, input_masks, output_mask, shapes):
    """Pads each channel axis that lost padded channels by their kept counts (those entries are
    constants: see :func:`pad_coupling`); the rest of the template stays as it is."""
    module = copy.deepcopy(module)
    template, ndim = module.argument(1, "pad"), len(shapes[-1])
    if not isinstance(template, (tuple, list)):
        return module
    pad = list(template)
    for axis, mask in output_mask.items():
        before, after = _axis_padding(pad, axis, ndim)
        if type(before) is int and type(after) is int and (before or after):
            position = 2 * (ndim - 1 - axis)
            pad[position:position + 2] = [int(mask[:before].sum()), int(mask[len(mask) - after:].sum())]
    module.set_argument(1, "pad", type(template)(pad))
    return module


class _ShortcutA(nn.Module):
    """A CIFAR ResNet block whose shortcut halves the grid and zero-pads the channels."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv1 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.conv2, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x))) + shortcut))


SPECS = (
    OpSpec("functional_padding", (PadOp,), flops=no_flops, coupling=pad_coupling, removal=remove_from_pad,
           example=lambda: (_ShortcutA(), (torch.randn(2, 3, 8, 8),))),
)
