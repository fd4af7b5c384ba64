"""Ops that move or drop positions along some axes and leave every other axis alone:
``flip``, ``roll``, ``narrow``, ``diff`` and ``Tensor.unfold`` (spatial flips for test-time
augmentation, shifted windows, crops, finite differences, sliding windows appended as a new last
axis).

Channels on the axes an op does not touch pass through. On a touched axis: ``flip`` reverses
the channels, an order that survives removal (the kept channels, reversed); ``roll``'s rotation
and ``narrow``'s and ``diff``'s positions are constants counted in the full width, so channels
there are barriers. The ops hold nothing per channel; removal keeps them as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from dagprune.ops.channel_map import argument_input, barrier_all, constant_argument, normalize_dims, operand_layout
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.slicing import unchanged_removal
from dagprune.ops.spec import OpSpec
from dagprune.ops.templates import InputRef

__all__ = ["SPECS"]


def _flip_dims(module):
    """``torch.flip(x, dims)``, or the method with the dims as separate arguments (``x.flip(2, 3)``)."""
    if module.function_name == "Tensor.flip" and len(module.args) > 2:
        dims = module.args[1:]
        return None if any(isinstance(d, InputRef) for d in dims) else list(dims)
    return constant_argument(module, 1, "dims")


def _touched_axes(module, values) -> list[int] | None:
    """The axes whose positions the op moves or drops (None: not known before run time)."""
    name = module.function_name.rsplit(".", 1)[-1]
    ndim = values[argument_input(module, 0, "input")].ndim
    if name == "flip":
        dims = _flip_dims(module)
    elif name == "roll":
        dims = constant_argument(module, 2, "dims", ())
        dims = None if dims in ((), []) else dims  # without dims it rolls the flattened tensor
    elif name == "unfold":  # Tensor.unfold(dimension, size, step): windows on a new last axis
        dims = constant_argument(module, 1, "dimension")
    else:  # narrow(x, dim, start, length), diff(x, n, dim)
        dims = constant_argument(module, 1, "dim") if name == "narrow" else constant_argument(module, 2, "dim", -1)
    if dims is None or (isinstance(dims, (list, tuple)) and not all(isinstance(d, int) for d in dims)):
        return None
    return normalize_dims(dims, ndim)


def positional_coupling(ctx, vertex, module, layouts, values, output):
    """See the module docstring."""
    x_index = argument_input(module, 0, "input")
    axes = None if x_index is None else _touched_axes(module, values)
    if axes is None or (module.function_name.endswith("diff") and _has_extra_tensors(module)):
        return barrier_all(ctx, layouts, "positions moved along axes known only at run time")
    layout = dict(operand_layout(ctx, vertex, layouts, x_index))
    flips = module.function_name.endswith("flip")
    for axis in axes:
        if axis in layout and flips:
            layout[axis] = layout[axis][::-1].copy()
        elif axis in layout:
            ctx.barrier(layout.pop(axis), f"{module.function_name} moves positions along this channel axis")
    return layout or None


def _has_extra_tensors(module) -> bool:
    """``diff`` with ``prepend`` / ``append`` tensors joins them along its axis."""
    return any(isinstance(module.argument(position, keyword), InputRef)
               for position, keyword in ((3, "prepend"), (4, "append")))


_NAMES = tuple(f"{namespace}.{name}" for name in ("flip", "roll", "narrow", "diff")
               for namespace in ("torch", "Tensor")) + ("Tensor.unfold",)


class _Positions(nn.Module):
    """Test-time flip averaging, a shifted window, a crop and a difference, around channels."""

    def __init__(self):
        super().__init__()
        self.first, self.last = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.first(x)
        x = (x + x.flip(3) + torch.flip(x, dims=[1])) / 3  # the channel flip reverses them
        x = torch.roll(x, shifts=(1, -1), dims=(2, 3)).narrow(2, 0, 4)
        x = x.unfold(3, 2, 1).mean(-1)  # sliding windows of 2 along the width
        return self.last(torch.cat([torch.diff(x, dim=-1), x[..., :1]], dim=-1))


def _example():
    return _Positions(), (torch.randn(2, 3, 6, 5),)


SPECS = (
    OpSpec("positional", _NAMES, flops=no_flops, coupling=positional_coupling, removal=unchanged_removal,
           example=_example),
)
