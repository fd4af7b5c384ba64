"""Elementwise ops: arithmetic between broadcast operands, and functions of each element.

The operands' channel axes are the same channels (a residual ``a + b`` joins its branches);
an axis carrying channels in one operand and broadcast or untracked in another is a barrier.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import nn

from dagprune.ops.channel_map import FREE_SIZE, FreeSize, ShapeTag, broadcast_axes, is_size_layout, tensor_layout
from dagprune.ops.elementwise import ElementwiseOp, PointwiseOp
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.slicing import unchanged_removal
from dagprune.ops.spec import OpSpec, describe_op, opaque_coupling
from dagprune.ops.templates import InputRef

__all__ = ["SPECS"]

_DTYPE_SOURCES = ("type_as", "to", "expand_as")  # a second tensor only gives dtype or device


def _tensor_operands(layouts, values) -> list:
    return [(tensor_layout(layouts[i]), v) for i, v in enumerate(values) if isinstance(v, torch.Tensor)]


def elementwise_coupling(ctx, vertex, module, layouts, values, output):
    if type(output) is int and layouts and all(isinstance(layout, FreeSize) for layout in layouts):
        return FREE_SIZE  # arithmetic on sizes no removal changes (B * heads)
    if isinstance(output, tuple) and module.short_name in ("add", "iadd"):
        return _concatenated_sizes(ctx, module, layouts, values, output)
    if isinstance(output, int) and module.short_name == "mul":
        repeated = _repeated_size(module, layouts)
        if repeated is not None:
            return repeated
    if isinstance(output, int) and module.short_name == "floordiv":
        divided = _divided_size(module, layouts)
        if divided is not None:
            return divided
    for index, layout in enumerate(layouts):  # a channel count in arithmetic: kept as a number
        if is_size_layout(layout):
            ctx.size_used_as_number(index, layout, values[index], output,
                                    f"channel count used by {describe_op(module)}")
    if not isinstance(output, torch.Tensor):
        return None  # arithmetic on Python numbers (shapes)
    return broadcast_axes(ctx, _tensor_operands(layouts, values), output.shape,
                          "elementwise with untracked operand") or None


def _concatenated_sizes(ctx, module, layouts, values, output: tuple):
    """``shape[:-1] + (x.size(-1),)``: a shape tuple built by concatenation keeps each size's
    channel tag at its new position (a reshape reads it from there)."""
    items: list = []
    for operand in (module.argument(0, None), module.argument(1, None)):
        if isinstance(operand, InputRef):
            layout = layouts[operand.index]
            items.extend(layout if isinstance(layout, tuple) else [None] * len(values[operand.index]))
        elif isinstance(operand, (tuple, list)):
            items.extend(layouts[item.index] if isinstance(item, InputRef) else None for item in operand)
        else:
            items = []
            break
    if len(items) != len(output):
        for layout in layouts:
            ctx.barrier_layout(layout, f"channel count used by {describe_op(module)}")
        return None
    return tuple(items) if any(isinstance(item, ShapeTag) for item in items) else None


def pointwise_coupling(ctx, vertex, module, layouts, values, output):
    if not isinstance(output, torch.Tensor):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    tensors = _tensor_operands(layouts, values)
    if module.short_name in _DTYPE_SOURCES and len(tensors) > 1:
        tensors = tensors[:1]
    return broadcast_axes(ctx, tensors, output.shape, f"{module.function_name} broadcast") or None


def _repeated_size(module, layouts):
    """``heads * n_rep``: a channel count times a constant sizes an axis holding each channel
    that many times in a row (grouped-query attention's key/value heads, repeated for the query
    heads); the reshape reading it checks the axis against it."""
    first, second = module.argument(0, None), module.argument(1, None)
    if isinstance(second, InputRef) and isinstance(first, int):
        first, second = second, first
    if not (isinstance(first, InputRef) and isinstance(second, int) and second > 0):
        return None
    tag = layouts[first.index]
    if not isinstance(tag, ShapeTag) or tag.is_derived:
        return None
    return ShapeTag(np.repeat(tag.atoms, second))


def _divided_size(module, layouts):
    """``C // heads``: a channel count divided by a constant that divides it sizes an axis of
    ``C / heads`` positions (the head dim of ``x.reshape(B, N, heads, C // heads)``); the
    reshape reading it rewrites it to its axis's kept count at removal. Used any other way, it
    bars all ``C`` channels."""
    first, second = module.argument(0, None), module.argument(1, None)
    if not (isinstance(first, InputRef) and isinstance(second, int) and second > 0):
        return None
    tag = layouts[first.index]
    if not isinstance(tag, ShapeTag) or tag.is_derived or len(tag.atoms) % second:
        return None
    return ShapeTag(tag.atoms[:len(tag.atoms) // second], sources=tag.atoms)


def size_comparison_coupling(ctx, vertex, module, layouts, values, output):
    """``==``, ``!=``, ``<``, ... (``operator``): on tensors, elementwise; on two equal channel
    counts (``torch._assert(x.shape[-1] == y.shape[-1])``), the two axes are the same channels,
    so that the comparison gives the same answer after removal. A channel count compared with
    anything else (a constant, a derived size) is barred."""
    if isinstance(output, torch.Tensor):
        return broadcast_axes(ctx, _tensor_operands(layouts, values), output.shape,
                              "compared with an untracked operand") or None
    if _same_answer_for_every_kept_count(module, layouts):
        return None
    tags = [layout for layout in layouts if layout is not None]
    if (len(tags) == 2 and len(layouts) == 2 and all(isinstance(t, ShapeTag) and not t.is_derived for t in tags)
            and len(tags[0].atoms) == len(tags[1].atoms)):
        ctx.unify(tags[0].atoms, tags[1].atoms)
        return None
    for layout in layouts:
        ctx.barrier_layout(layout, f"channel count used by {describe_op(module)}")
    return None


def _same_answer_for_every_kept_count(module, layouts) -> bool:
    """A channel count compared with a constant that gives one answer for any count removal can
    leave (1 to the full count: every group keeps a channel): ``0 in x.shape``, ``x.size(1) > 0``."""
    first, second = module.argument(0, None), module.argument(1, None)
    compare = getattr(operator, module.short_name, None)
    counted, constant = (first, second) if isinstance(first, InputRef) else (second, first)
    if compare is None or not isinstance(counted, InputRef) or not isinstance(constant, (int, float)) \
            or isinstance(constant, bool) or not isinstance(layouts[counted.index], ShapeTag):
        return False
    full = len(layouts[counted.index].atoms)
    answer = (lambda count: compare(count, constant)) if counted is first else (lambda count: compare(constant, count))
    return all(answer(count) == answer(full) for count in range(1, full + 1))


class _CheckedWidths(nn.Module):
    """Two branches whose widths the forward asserts equal."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 3, padding=1)
        self.left_head, self.right_head = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        left, right = self.left(x), self.right(x)
        torch._assert(left.shape[1] == right.shape[1], "the branches' widths differ")
        return self.left_head(left) + self.right_head(right)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.branch, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.sigmoid(x + self.branch(x) * 0.5))


SPECS = (
    # reads sizes: a shape tuple concatenation keeps its channel counts' tags (others are barred)
    OpSpec("elementwise", (ElementwiseOp,), flops=no_flops, coupling=elementwise_coupling,
           removal=unchanged_removal, reads_sizes=True, example=lambda: (_Residual(), (torch.randn(1, 3, 5, 5),))),
    OpSpec("pointwise", (PointwiseOp,), flops=no_flops, coupling=pointwise_coupling,
           removal=unchanged_removal, example=lambda: (_Residual(), (torch.randn(1, 3, 5, 5),))),
    OpSpec("size_comparison", tuple(f"operator.{name}" for name in ("eq", "ne", "gt", "lt", "ge", "le")),
           flops=no_flops,
           coupling=size_comparison_coupling, removal=unchanged_removal, reads_sizes=True,
           example=lambda: (_CheckedWidths(), (torch.randn(1, 3, 5, 5),))),
)
