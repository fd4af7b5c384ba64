"""Reshapes and repeats: view / reshape / flatten / (un)squeeze, nn.Flatten / nn.Unflatten,
expand / repeat / tile.

A reshape that splits a channel axis keeps the channels on one of the new axes and ties the
others; sizes read at run time from channel axes (``x.view(B, C, -1)``) are followed, and
removal rewrites every size constant for the kept channels (a head count or head dim never goes
stale).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from dagprune.ops.base import FunctionalOp
from dagprune.ops.channel_map import (ChannelFreeMasks, Layout, ShapeTag, argument_input, argument_value,
                                      barrier_all, is_size_layout, tensor_layout)
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.linear_algebra import AttentionOp, MatmulOp
from dagprune.ops.shape import ExpandOp, ReshapeOp
from dagprune.ops.slicing import kept_shape, unchanged_removal
from dagprune.ops.spec import OpSpec
from dagprune.ops.templates import InputRef

__all__ = ["SPECS", "reshape_axis_groups", "whole_size_input"]


def reshape_axis_groups(in_shape, out_shape) -> list[tuple[list[int], list[int]]]:
    """Pairs runs of input axes with runs of output axes of equal element count.

    >>> reshape_axis_groups((2, 6, 4), (2, 3, 2, 4))
    [([0], [0]), ([1], [1, 2]), ([2], [3])]
    """
    groups, i, j = [], 0, 0
    in_shape, out_shape = list(in_shape), list(out_shape)
    while i < len(in_shape) or j < len(out_shape):
        in_axes, out_axes = [], []
        in_product = out_product = 1
        while True:
            if in_product <= out_product and i < len(in_shape) and (not in_axes or in_product < out_product
                                                                   or in_shape[i] == 1):
                in_product *= in_shape[i]
                in_axes.append(i)
                i += 1
            elif j < len(out_shape) and (out_product < in_product or not out_axes or out_shape[j] == 1):
                out_product *= out_shape[j]
                out_axes.append(j)
                j += 1
            else:
                break
            if in_product == out_product and in_axes and out_axes and not (
                    (i < len(in_shape) and in_shape[i] == 1) or (j < len(out_shape) and out_shape[j] == 1)):
                break
        if in_product != out_product:
            return []
        groups.append((in_axes, out_axes))
    return groups


_HEAD_LOOKAHEAD = 48  # vertices followed from a reshape to the attention that reads its heads


def _feeds_attention(ctx, vertex) -> bool:
    """Whether ``vertex``'s output reaches an attention or batched matmul through ops that only
    move axes, repeat or act per element (permute, unbind, q/k norms, rotary embeddings,
    grouped-query attention's repeat of the key/value heads), not through a layer with weights."""
    frontier, seen = list(ctx.users.get(vertex, ())), set()
    while frontier and len(seen) < _HEAD_LOOKAHEAD:
        user = frontier.pop(0)
        if user in seen:
            continue
        seen.add(user)
        module = user.module
        if isinstance(module, (AttentionOp, MatmulOp)):
            return True
        has_weights = any(True for _ in module.parameters(recurse=False))
        if has_weights and not isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
            continue
        frontier.extend(ctx.users.get(user, ()))
    return False


def _reshape_layout(ctx, layout: Layout, in_shape, out_shape, splits_heads: bool = False):
    """The output layout of a reshape. A channel axis split into several output axes keeps its
    channels on the innermost varying one (a head dim) and ties the others (the same head dim in
    every head), or, with ``splits_heads``, keeps them on the axis just outside it (whole heads,
    every dim of a head tied)."""
    groups = reshape_axis_groups(in_shape, out_shape)
    if not groups:
        ctx.barrier_layout(layout, "reshape not understood")
        return None
    result = {}
    for in_axes, out_axes in groups:
        tracked = [axis for axis in in_axes if axis in layout]
        if not tracked:
            continue
        if len(tracked) > 1:
            ctx.barrier_layout({a: layout[a] for a in tracked}, "reshape merges two channel axes")
            continue
        (axis,) = tracked
        in_sizes = [in_shape[a] for a in in_axes]
        expand = [1] * len(in_axes)
        expand[in_axes.index(axis)] = in_shape[axis]
        block = np.broadcast_to(layout[axis].reshape(expand), in_sizes).reshape(
            [out_shape[a] for a in out_axes])
        varying = [k for k in range(block.ndim)
                   if block.shape[k] > 1 and not np.all(block == block.take([0], axis=k))]
        if not varying:
            continue
        keep = varying[-1]  # the innermost varying axis keeps its channels; others are tied
        if splits_heads and keep - 1 in varying:
            keep -= 1  # the head axis, just outside the head dim
        for index in range(block.shape[keep]):
            ctx.tie(block.take(index, axis=keep))
        representative = block[tuple(slice(None) if k == keep else 0 for k in range(block.ndim))]
        result[out_axes[keep]] = np.ascontiguousarray(representative)
    return result or None


def _size_arguments(module, ndim: int) -> list:
    """The size argument given for each output axis of view/reshape/expand (or [])."""
    if not isinstance(module, FunctionalOp) or module.short_name not in ("view", "reshape", "expand"):
        return []
    keyword = {"view": "size", "reshape": "shape", "expand": "size"}[module.short_name]
    sizes = module.argument(1, keyword)
    if not isinstance(sizes, (tuple, list)):
        sizes = module.args[1:]
    return list(sizes) if len(sizes) == ndim else []


def whole_size_input(module) -> int | None:
    """The input holding the whole size tuple of view/reshape/expand (``x.expand(y.shape)``;
    not ``x.expand(B, -1)``, whose first size alone is an input)."""
    if not isinstance(module, FunctionalOp) or module.short_name not in ("view", "reshape", "expand"):
        return None
    keyword = {"view": "size", "reshape": "shape", "expand": "size"}[module.short_name]
    sizes = module.argument(1, keyword)
    whole = isinstance(sizes, InputRef) and (keyword in module.kwargs or len(module.args) == 2)
    return sizes.index if whole else None


def _couple_sizes(ctx, module, layouts, values, result: Layout, out_shape: tuple, unify_tracked: bool) -> Layout:
    """Couples output axes with the channel axes their run-time sizes were read from.

    A size shaping an axis that carries no channels, or another number of them, bars the axis it
    was read from (and that output axis). An axis carrying as many channels is unified with the size's
    axis only with ``unify_tracked`` (expand); a reshape's size there becomes the kept count at
    removal, so the axis it was read from (a residual stream's ``C`` shaping the merged
    attention heads) is pruned on its own."""
    result, ndim = dict(result or {}), len(out_shape)
    tags = [layouts[size.index] if isinstance(size, InputRef) else None
            for size in _size_arguments(module, ndim)]
    whole = whole_size_input(module)
    if whole is not None:
        whole_layout = layouts[whole]
        tags = list(whole_layout) if isinstance(whole_layout, tuple) and len(whole_layout) == ndim else [None] * ndim
        fixed = _batch_merging_axes(values[0], out_shape) if module.short_name in ("view", "reshape") \
            else frozenset(range(ndim))  # expand: no overrides
        result = _bar_sizes_made_elsewhere(ctx, result, tags, fixed, values[whole])
        unify_tracked = True  # a whole run-time shape cannot be rewritten: its axes must agree
    for axis, tag in enumerate(tags):
        if not isinstance(tag, ShapeTag):
            continue
        atoms = result.get(axis)
        if atoms is not None and len(atoms) == len(tag.atoms) and not (unify_tracked and tag.is_derived):
            if unify_tracked:
                ctx.unify(atoms, tag.atoms)
        else:
            ctx.barrier(tag.all_atoms, "size read from a channel axis shapes an untracked axis")
            if atoms is not None:
                ctx.barrier(atoms, "shaped by a size read from another axis")
                result.pop(axis)
    for index, layout in enumerate(layouts):  # tags used any other way
        if index != whole and isinstance(layout, tuple) and is_size_layout(layout):
            ctx.barrier_layout(layout, "shape tuple passed whole")
    return result


def _bar_sizes_made_elsewhere(ctx, result: Layout, tags: list, fixed_axes: frozenset, sizes) -> Layout:
    """A whole shape tuple computed by other ops (``x.size()[:-1] + (heads, dim)``): a view or
    reshape's size for a channel axis is replaced by the kept count at removal
    (``ReshapeOp.size_overrides``), except on an axis that merges the batch with channels (its
    size follows the batch): the channels of ``fixed_axes`` not read from a channel axis (or
    left to the reshape, -1) cannot be removed."""
    for axis, atoms in list((result or {}).items()):
        inferred = isinstance(sizes, (tuple, list)) and axis < len(sizes) and sizes[axis] == -1
        if axis in fixed_axes and axis < len(tags) and not isinstance(tags[axis], ShapeTag) and not inferred:
            ctx.barrier(atoms, "shaped by a size computed outside the reshape")
            result.pop(axis)
    return result


def _batch_merging_axes(x, out_shape: tuple) -> frozenset:
    """Output axes of a reshape of ``x`` whose axis group holds input axis 0 (the batch); every
    axis where the shapes do not pair up."""
    groups = reshape_axis_groups(tuple(x.shape), out_shape) if isinstance(x, torch.Tensor) else []
    if not groups:
        return frozenset(range(len(out_shape)))
    return frozenset(axis for in_axes, out_axes in groups if 0 in in_axes for axis in out_axes)


def reshape_coupling(ctx, vertex, module, layouts, values, output):
    x_index = argument_input(module, 0, "input") if isinstance(module, FunctionalOp) else 0
    if x_index is None or not isinstance(output, torch.Tensor):
        return barrier_all(ctx, layouts, "reshape of a constant")
    other_tensors = [i for i, v in enumerate(values) if i != x_index and isinstance(v, torch.Tensor)]
    template = other_tensors[0] if len(other_tensors) == 1 and values[other_tensors[0]].shape == output.shape \
        else None
    for index in other_tensors:
        if index != template:
            ctx.barrier_layout(layouts[index], "reshape template tensor")
    layout = tensor_layout(layouts[x_index])
    splits_heads = ctx.head_pruning == "heads" and _feeds_attention(ctx, vertex)
    result = (_reshape_layout(ctx, layout, tuple(values[x_index].shape), tuple(output.shape), splits_heads)
              if layout else None)
    if template is not None:
        result = _follow_template(ctx, result, tensor_layout(layouts[template]))
    elif other_tensors and result:
        ctx.barrier_layout(result, "reshaped like another tensor")
        result = None
    return _couple_sizes(ctx, module, layouts, values, result, tuple(output.shape), unify_tracked=False) or None


def _follow_template(ctx, result: Layout, template: dict) -> Layout:
    """``x.view_as(t)`` / ``x.reshape_as(t)``: the output takes ``t``'s shape, so each output axis
    keeps channels only where ``t``'s same axis holds as many, and both are removed together
    (``bn(x.flatten(0, 1)).reshape_as(x)``); a channel axis on one side only is barred."""
    result = dict(result or {})
    for axis in sorted(set(result) | set(template)):
        atoms, template_atoms = result.get(axis), template.get(axis)
        if atoms is not None and template_atoms is not None and len(atoms) == len(template_atoms):
            ctx.unify(atoms, template_atoms)
            continue
        if template_atoms is not None:
            ctx.barrier(template_atoms, "reshape template axis without the same channels in the input")
        if atoms is not None:
            ctx.barrier(atoms, "reshaped to a template axis without the same channels")
            result.pop(axis)
    return result


def expand_coupling(ctx, vertex, module, layouts, values, output):
    if module.short_name == "repeat_interleave":
        return _repeat_interleave_coupling(ctx, module, layouts, values)
    layout = tensor_layout(layouts[0])
    offset = output.ndim - values[0].ndim
    result = {}
    for axis, atoms in layout.items():
        if output.shape[axis + offset] == len(atoms):
            result[axis + offset] = atoms
        else:
            ctx.barrier(atoms, f"{module.short_name} repeats a channel axis")
    for index, layout_other in enumerate(layouts[1:], start=1):
        if isinstance(values[index], torch.Tensor):
            ctx.barrier_layout(layout_other, "expand template tensor")
    result.update(_broadcast_to_channel_counts(module, layouts, values[0].shape, offset, result))
    return _couple_sizes(ctx, module, layouts, values, result, tuple(output.shape), unify_tracked=True) or None


def _repeat_interleave_coupling(ctx, module, layouts, values):
    """``x.repeat_interleave(k, dim)`` with a constant ``k``: each channel of ``dim`` repeated
    ``k`` times in place (GPT-J's rotary angles ``sin.repeat_interleave(2, 3)``), so the slim
    input repeats its kept channels; a tensor of repeats, a flattening call (no ``dim``) or an
    ``output_size`` bars the input's channels."""
    repeats, dim = argument_value(module, values, 1, "repeats"), argument_value(module, values, 2, "dim")
    x = values[0]
    if type(repeats) is not int or type(dim) is not int or module.argument(3, "output_size") is not None \
            or not isinstance(x, torch.Tensor):
        return barrier_all(ctx, layouts, "repeat_interleave by a tensor, without a dim or to an output size")
    for other in layouts[1:]:
        ctx.barrier_layout(other, "repeats of repeat_interleave")
    result, dim = dict(tensor_layout(layouts[0])), dim % x.ndim
    if dim in result:
        result[dim] = np.repeat(result[dim], repeats)
    return result or None


def _broadcast_to_channel_counts(module, layouts, in_shape, offset: int, result: Layout) -> Layout:
    """Axes a size-1 (or new) axis is expanded to a channel count read at run time (token
    pruning's ``index.unsqueeze(-1).expand(-1, -1, x.shape[-1])``): the same value for every
    channel, an axis of those channels (its size follows the kept count after removal)."""
    counted = {}
    for axis, size in enumerate(_size_arguments(module, len(in_shape) + offset)):
        tag = layouts[size.index] if isinstance(size, InputRef) else None
        broadcast = axis < offset or in_shape[axis - offset] == 1
        if isinstance(tag, ShapeTag) and not tag.is_derived and broadcast and axis not in result:
            counted[axis] = tag.atoms
    return counted


def _rewrite_sizes(sizes, new_sizes: list[int], old_sizes, static_positions=frozenset()) -> Any:
    """Replaces the sizes of axes that lost channels by the new count; keeps -1.

    A run-time size (an ``InputRef``, e.g. ``C`` in timm's ``x.reshape(B, N, C)`` read from
    another tensor's shape) is replaced too: it may come from a tensor whose channels were
    pruned differently (the residual stream vs. the attention head dims). ``static_positions``
    are positions whose run-time sizes are replaced even where the analysed size is unchanged
    (see :func:`_remove_reshape`); channel-derived sizes are fixed after removal.
    """
    rewritten = []
    for position, (value, new, old) in enumerate(zip(sizes, new_sizes, old_sizes)):
        changeable = isinstance(value, InputRef) or (isinstance(value, int) and value != -1)
        rewritten.append(new if changeable and (new != old or position in static_positions) else value)
    return type(sizes)(rewritten) if isinstance(sizes, (tuple, list)) else rewritten


def _channel_derived_axes(in_shape, out_shape, input_masks) -> frozenset:
    """Output axes of a reshape that split or merge a channel-carrying input axis.

    Their run-time sizes (``c // 4`` in a channel shuffle's ``view(b, 4, c // 4, h, w)``) need
    not match how the layout distributes the kept channels over them (the shuffle may keep
    fewer of the 4 groups instead of fewer channels per group), so they become constants.
    """
    masked = input_masks[0] if isinstance(input_masks[0], dict) else {}
    # The batch axis is 1 in the analysis, so it joins the channels it is merged with; an output
    # axis 0 holding it (BottleneckAttn's q.reshape(B * heads, dim_head, -1)) stays run-time.
    return frozenset(axis for in_axes, out_axes in reshape_axis_groups(in_shape, out_shape)
                     if any(a in masked for a in in_axes) for axis in out_axes
                     if not (axis == 0 and 0 in in_axes))


def _channel_free_positions(sizes, input_masks) -> frozenset:
    """Positions of run-time sizes built only from sizes no removal changes (:class:`FreeSize`):
    ``B * heads`` in a seq-first ``q.view(T, B * heads, dim)`` stays computed at run time."""
    return frozenset(position for position, size in enumerate(sizes)
                     if isinstance(size, InputRef) and isinstance(input_masks[size.index], ChannelFreeMasks))


def _size_overrides(module: ReshapeOp, sizes, new_shape, old_shape) -> tuple:
    """The op's overrides with every axis that lost channels set to its kept count, except
    where the analysed shape tuple left the size to the reshape (-1)."""
    inferred = {axis for axis, size in enumerate(sizes) if size == -1} if isinstance(sizes, (tuple, list)) else set()
    changed = {axis: new for axis, (new, old) in enumerate(zip(new_shape, old_shape))
               if new != old and axis not in inferred}
    return tuple(sorted({**dict(module.size_overrides), **changed}.items()))


def remove_from_reshape(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    old_shape = shapes[-1]
    new_shape = kept_shape(old_shape, output_mask)
    name = module.short_name
    if name in ("view", "reshape"):
        keyword = "shape" if name == "reshape" else "size"
        shape_argument = module.argument(1, keyword)
        static = _channel_derived_axes(shapes[0], old_shape, input_masks) - _channel_free_positions(
            shape_argument if isinstance(shape_argument, (tuple, list)) else module.args[1:], input_masks)
        if isinstance(shape_argument, (tuple, list)):
            module.set_argument(1, keyword, _rewrite_sizes(shape_argument, new_shape, old_shape, static))
        elif whole_size_input(module) is not None:  # computed at run time: its channel axes overridden
            module.size_overrides = _size_overrides(module, shapes[whole_size_input(module)], new_shape, old_shape)
        else:
            varargs = list(module.args[1:])
            module.args = (module.args[0], *_rewrite_sizes(varargs, new_shape, old_shape, static))
    elif name == "unflatten":
        dim = module.argument(1, "dim") % len(shapes[0])
        sizes = module.argument(2, "sizes")
        count = len(sizes)
        module.set_argument(2, "sizes", _rewrite_sizes(sizes, new_shape[dim:dim + count],
                                                       old_shape[dim:dim + count]))
    return module


def remove_from_unflatten_module(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    dim = module.dim % len(shapes[0])
    count = len(module.unflattened_size)
    module.unflattened_size = tuple(_rewrite_sizes(list(module.unflattened_size),
                                                   kept_shape(shapes[-1], output_mask)[dim:dim + count],
                                                   shapes[-1][dim:dim + count]))
    return module


def remove_from_expand(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    if module.short_name == "expand":
        new_shape = kept_shape(shapes[-1], output_mask)
        sizes = module.argument(1, "size")
        if isinstance(sizes, (tuple, list)):
            module.set_argument(1, "size", _rewrite_sizes(sizes, new_shape, shapes[-1]))
        elif whole_size_input(module) is not None:
            pass  # a whole run-time shape (x.expand(y.shape)): y's channel axes are coupled
        else:
            module.args = (module.args[0], *_rewrite_sizes(list(module.args[1:]), new_shape, shapes[-1]))
    return module


class _Heads(nn.Module):
    """Splits channels into heads and merges them back with a size read at run time."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        b, n, c = x.shape
        heads = self.up(x).reshape(b, n, 2, -1).expand(b, n, 2, 4).transpose(1, 2)
        return self.down(heads.transpose(1, 2).flatten(2))


SPECS = (
    # a reshape's run-time sizes of channel axes can be wrong even where its own channels are
    # all kept: its removal facet sees every channel axis
    OpSpec("reshape", (ReshapeOp,), flops=no_flops, coupling=reshape_coupling,
           removal=remove_from_reshape, reads_sizes=True, full_masks=True,
           example=lambda: (_Heads(), (torch.randn(1, 3, 4),))),
    OpSpec("flatten_module", (nn.Flatten,), flops=no_flops, coupling=reshape_coupling,
           removal=unchanged_removal, reads_sizes=True,
           example=lambda: (nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(16, 2)),
                            (torch.randn(1, 3, 2, 2),))),
    OpSpec("unflatten_module", (nn.Unflatten,), flops=no_flops, coupling=reshape_coupling,
           removal=remove_from_unflatten_module, reads_sizes=True,
           example=lambda: (nn.Sequential(nn.Linear(4, 8), nn.Unflatten(-1, (2, 4)), nn.Flatten(-2),
                                          nn.Linear(8, 2)), (torch.randn(1, 4),))),
    OpSpec("expand", (ExpandOp,), flops=no_flops, coupling=expand_coupling,
           removal=remove_from_expand, reads_sizes=True,
           example=lambda: (_Heads(), (torch.randn(1, 3, 4),))),
)
