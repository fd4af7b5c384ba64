"""Tensors made to the shape of others (``torch.zeros_like(x)``, ``x.new_zeros(x.shape)``,
``torch.zeros(x.shape[0], x.shape[1])``, ``torch.full_like``, ``torch.randn_like``, ...) and rows
accumulated into them by index (``index_add``, ``index_copy``).

Their values do not depend on any channel's values, so a channel axis of the tensor they copy
the shape of (the input of a ``*_like``, the axis a size was read from) is the same channels on
the new tensor's axis: an accumulator filled later (``torch.zeros(n, x.shape[1]).index_add(...)``),
a noise tensor, a constant added to ``x``. After removal the sizes are read from the slim tensors
at run time, so nothing is rewritten. A size computed from a channel count (``C // heads``), or
one that is not a size of a tracked axis, leaves that axis untracked (derived sizes bar their
channels, as anywhere a size is used in a way not followed).
"""

from __future__ import annotations

import torch
from torch import nn

from dagprune.ops.channel_map import ShapeTag, argument_value, broadcast_axes, tensor_layout
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.slicing import unchanged_removal
from dagprune.ops.spec import OpSpec, opaque_coupling
from dagprune.ops.templates import InputRef

__all__ = ["SPECS"]

_LIKE = ("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like")
_SIZED = ("zeros", "ones", "empty", "full", "rand", "randn")
_NEW = ("new_zeros", "new_ones", "new_empty", "new_full")


def like_coupling(ctx, vertex, module, layouts, values, output):
    """The copied tensor's channel axes, on the same axes of the new one."""
    if not isinstance(output, torch.Tensor) or not isinstance(values[0], torch.Tensor):
        return None
    return dict(tensor_layout(layouts[0])) or None


def sized_coupling(ctx, vertex, module, layouts, values, output):
    """Each size read from a channel axis gives the new tensor's axis at its position those
    channels."""
    sizes = _size_layouts(module, layouts)
    result = {}
    for axis, size in enumerate(sizes):
        if isinstance(size, ShapeTag) and not size.is_derived and len(size.atoms) == output.shape[axis]:
            result[axis] = size.atoms
        elif size is not None:
            ctx.barrier_layout(size, f"size given to {module.short_name}")
    size_inputs = _size_inputs(module)
    leftovers = [layout for index, layout in enumerate(layouts) if index not in size_inputs]
    for layout in leftovers:  # new_zeros' source tensor gives dtype and device only
        if not isinstance(layout, dict):
            ctx.barrier_layout(layout, f"channel count used by {module.short_name}")
    return result or None


def _size_arguments(module) -> list:
    """The size arguments of a factory call: one per axis, or one shape sequence."""
    if "size" in module.kwargs:
        return [module.kwargs["size"]]
    arguments = list(module.args[1:] if module.short_name in _NEW else module.args)
    return arguments[:1] if module.short_name in ("full", "new_full") else arguments


def _size_inputs(module) -> set[int]:
    indexes = set()
    for argument in _size_arguments(module):
        items = argument if isinstance(argument, (tuple, list)) else [argument]
        indexes.update(item.index for item in items if isinstance(item, InputRef))
    return indexes


def _size_layouts(module, layouts) -> list:
    """The layout of each size (a :class:`ShapeTag` for one read from a channel axis)."""
    arguments = _size_arguments(module)
    if len(arguments) == 1:
        single = arguments[0]
        if isinstance(single, InputRef) and isinstance(layouts[single.index], tuple):
            return list(layouts[single.index])  # a shape read whole: torch.zeros(x.shape)
        if isinstance(single, (tuple, list)):
            arguments = list(single)
    return [layouts[item.index] if isinstance(item, InputRef) else None for item in arguments]


def index_accumulate_coupling(ctx, vertex, module, layouts, values, output):
    """``x.index_add(dim, index, source)``: rows of ``source`` along ``dim`` added (or copied)
    into rows of ``x`` the index picks; every other axis is the same channels in both and the
    result (tracked in one of them only, they are barred); channels along ``dim`` are barred."""
    x, dim = argument_value(module, values, 0, "input"), argument_value(module, values, 1, "dim")
    source_ref = module.argument(3, "source")
    if not isinstance(x, torch.Tensor) or not isinstance(dim, int) or not isinstance(source_ref, InputRef):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    dim %= x.ndim
    x_ref = module.argument(0, "input")  # a constant tensor (zeros of literal sizes) is untracked
    x_layout = dict(tensor_layout(layouts[x_ref.index])) if isinstance(x_ref, InputRef) else {}
    source_layout = dict(tensor_layout(layouts[source_ref.index]))
    for layout in (x_layout, source_layout):
        if dim in layout:
            ctx.barrier(layout.pop(dim), f"{module.short_name} along a channel axis")
    index_ref = module.argument(2, "index")
    if isinstance(index_ref, InputRef):
        ctx.barrier_layout(layouts[index_ref.index], f"index of {module.short_name}")
    operands = [(x_layout, x), (source_layout, values[source_ref.index])]
    return broadcast_axes(ctx, operands, output.shape, f"{module.short_name} with an untracked operand") or None


class _Accumulated(nn.Module):
    """Features summed per segment into zeros shaped by a size read from them, with a
    constant and noise of the same shape added."""

    def __init__(self):
        super().__init__()
        self.encode, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x, segment):
        h = torch.relu(self.encode(x))
        pooled = torch.zeros(3, h.shape[1]).index_add(0, segment, h)
        pooled = pooled + h.new_zeros(3, h.shape[1]) + torch.full_like(pooled, 0.5) * 0.0
        return self.head(pooled + torch.zeros_like(pooled))


def _names(short_names, namespace) -> tuple[str, ...]:
    return tuple(f"{namespace}.{name}" for name in short_names)


def _example():
    return _Accumulated(), (torch.randn(6, 4), torch.tensor([0, 2, 1, 1, 0, 2]))


_INDEX_ACCUMULATE = ("index_add", "index_add_", "index_copy", "index_copy_")

SPECS = (
    OpSpec("like_factory", _names(_LIKE, "torch"), flops=no_flops, coupling=like_coupling,
           removal=unchanged_removal, example=_example),
    OpSpec("sized_factory", _names(_SIZED, "torch") + _names(_NEW, "Tensor"), flops=no_flops,
           coupling=sized_coupling, removal=unchanged_removal, reads_sizes=True, example=_example),
    OpSpec("index_accumulate", _names(_INDEX_ACCUMULATE, "Tensor") + _names(("index_add", "index_copy"), "torch"),
           flops=no_flops, coupling=index_accumulate_coupling, removal=unchanged_removal, example=_example),
)
