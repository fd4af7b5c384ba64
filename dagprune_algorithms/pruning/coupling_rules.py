"""Per-op channel coupling rules, registered by module type, op family or function name.

A rule has the signature ``rule(ctx, vertex, module, layouts, values, output) -> layout`` where
``layouts``/``values`` are the layouts and example values of the vertex's inputs, ``output`` its
example output, and ``ctx`` a :class:`~dagprune_algorithms.pruning.channel_groups.CouplingContext`.
An op without a rule is opaque: every channel reaching it becomes a barrier.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dagprune import InnerVertex, ops
from dagprune.flops import vertex_flops
from dagprune.ops import InputRef

from dagprune_algorithms.pruning.channel_groups import (CouplingContext, Layout, ShapeTag,
                                                        iter_layout_atoms)

__all__ = ["register_coupling_rule", "apply_coupling_rule", "reshape_axis_groups"]

CouplingRule = Callable[..., Any]
_RULES: dict[Any, CouplingRule] = {}


def register_coupling_rule(*keys, reads_sizes: bool = False):
    """Registers a coupling rule for module types, op classes or function names.

    Args:
        reads_sizes: the rule understands :class:`ShapeTag` inputs (sizes read from channel
            axes at run time). For other rules such inputs are barred before the rule runs.
    """
    def decorator(rule: CouplingRule) -> CouplingRule:
        rule.reads_sizes = reads_sizes
        for key in keys:
            _RULES[key] = rule
        return rule
    return decorator


def _is_size_layout(layout: Any) -> bool:
    if isinstance(layout, ShapeTag):
        return True
    return isinstance(layout, tuple) and any(isinstance(item, ShapeTag) for item in layout)


def rule_for(module: nn.Module) -> CouplingRule | None:
    """The rule that applies to ``module``: by function name, then by type (most derived first)."""
    return ops.handler_for(_RULES, module)


def apply_coupling_rule(ctx: CouplingContext, vertex: InnerVertex, layouts: list, values: list,
                        output: Any) -> Any:
    """Applies the registered rule of ``vertex``'s module, or the opaque rule."""
    rule = rule_for(vertex.module)
    if rule is None:
        return _opaque(ctx, layouts, f"no coupling rule for {_describe(vertex.module)}")
    if not rule.reads_sizes and any(_is_size_layout(layout) for layout in layouts):
        layouts = list(layouts)
        for index, layout in enumerate(layouts):
            if _is_size_layout(layout):  # a channel count used in a way we do not follow
                ctx.barrier_layout(layout, f"channel count used by {_describe(vertex.module)}")
                layouts[index] = None
    layout = rule(ctx, vertex, vertex.module, layouts, values, output)
    return _check_layout(ctx, layout, output)


def _describe(module: nn.Module) -> str:
    return module.function_name if isinstance(module, ops.FunctionalOp) else type(module).__name__


def _opaque(ctx: CouplingContext, layouts: list, reason: str) -> None:
    ctx.barrier_layout(layouts, reason)
    return None


def _check_layout(ctx: CouplingContext, layout: Any, output: Any) -> Any:
    """Drops (and bars) atoms that do not fit the output's shape: a rule's safety net."""
    if isinstance(layout, ShapeTag):
        if isinstance(output, int) and output == len(layout.atoms):
            return layout
        ctx.barrier(layout.atoms, "size tag does not match the value")
        return None
    if isinstance(layout, dict):
        if not isinstance(output, torch.Tensor):
            ctx.barrier_layout(layout, "channels flow into a non-tensor value")
            return None
        fitted = {}
        for axis, atoms in layout.items():
            if 0 <= axis < output.ndim and output.shape[axis] == len(atoms):
                fitted[axis] = atoms
            else:
                ctx.barrier(atoms, "layout does not match output shape")
        return fitted or None
    if isinstance(layout, (tuple, list)) and isinstance(output, (tuple, list)) \
            and len(layout) == len(output):
        return type(layout)(_check_layout(ctx, item, value) for item, value in zip(layout, output))
    if layout is not None:
        ctx.barrier_layout(layout, "layout does not match output structure")
    return None


# ------------------------------------------------------------------------------- helpers
def _tensor_layout(layout: Any) -> Layout:
    return layout if isinstance(layout, dict) else {}


def _argument_value(module: ops.FunctionalOp, values: list, position: int | None, keyword: str | None,
                    default=None):
    argument = module.argument(position, keyword, default)
    return values[argument.index] if isinstance(argument, InputRef) else argument


def _argument_input(module: ops.FunctionalOp, position: int | None, keyword: str | None) -> int | None:
    argument = module.argument(position, keyword)
    return argument.index if isinstance(argument, InputRef) else None


def _normalize_dims(dims, ndim: int) -> list[int]:
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return [d % ndim for d in dims]


def _base_flops(vertex: InnerVertex, values: list, output: Any) -> int:
    return vertex_flops(vertex, values, output)


def _channel_atoms(ctx: CouplingContext, layout: Layout, reason: str) -> np.ndarray | None:
    """The atoms of axis 1 (channels, NC... layout); atoms on any other axis become barriers."""
    for axis, atoms in layout.items():
        if axis != 1:
            ctx.barrier(atoms, reason)
    return layout.get(1)


def _broadcast_axes(ctx: CouplingContext, tensors: list[tuple[Layout, torch.Tensor]],
                    output_shape: torch.Size, reason: str) -> Layout:
    """Couples the non-broadcast axes of several tensors combined elementwise."""
    out_ndim = len(output_shape)
    result: Layout = {}
    for axis in range(out_ndim):
        participants = []
        for layout, value in tensors:
            input_axis = axis - (out_ndim - value.ndim)
            if input_axis >= 0 and value.shape[input_axis] == output_shape[axis] and output_shape[axis] > 1:
                participants.append(layout.get(input_axis))
        tracked = [atoms for atoms in participants if atoms is not None]
        if not tracked:
            continue
        if len(tracked) < len(participants):
            for atoms in tracked:
                ctx.barrier(atoms, reason)
            continue
        for atoms in tracked[1:]:
            ctx.unify(tracked[0], atoms)
        result[axis] = tracked[0]
    return result


# ------------------------------------------------------------------------------- producers
@register_coupling_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                        nn.ConvTranspose3d)
def _conv_rule(ctx, vertex, module, layouts, values, output):
    in_atoms = _channel_atoms(ctx, _tensor_layout(layouts[0]),
                              "convolution over a channel-tracked spatial axis")
    out_atoms = ctx.produce(module.out_channels, axis=1)
    groups = module.groups
    if groups == 1:
        if in_atoms is not None:
            ctx.consume(vertex, 0, 1, in_atoms)
        factors = [out_atoms] + ([in_atoms] if in_atoms is not None else [])
    else:
        if in_atoms is None:
            ctx.barrier(out_atoms, "grouped convolution of an untracked input")
        else:
            in_per_group = module.in_channels // groups
            out_per_group = module.out_channels // groups
            for group in range(groups):  # a whole conv group is kept or removed
                ctx.tie(np.concatenate([in_atoms[group * in_per_group:(group + 1) * in_per_group],
                                        out_atoms[group * out_per_group:(group + 1) * out_per_group]]))
        factors = [out_atoms]
    ctx.count_flops(vertex, _base_flops(vertex, values, output), factors)
    return {1: out_atoms}


@register_coupling_rule(nn.Linear)
def _linear_rule(ctx, vertex, module, layouts, values, output):
    x_layout = dict(_tensor_layout(layouts[0]))
    last = values[0].ndim - 1
    in_atoms = x_layout.pop(last, None)
    if in_atoms is not None:
        ctx.consume(vertex, 0, last, in_atoms)
    out_atoms = ctx.produce(module.out_features, axis=last)
    factors = [out_atoms] + ([in_atoms] if in_atoms is not None else []) + list(x_layout.values())
    ctx.count_flops(vertex, _base_flops(vertex, values, output), factors)
    return {**x_layout, last: out_atoms}


@register_coupling_rule(ops.ParameterOp)
def _parameter_rule(ctx, vertex, module, layouts, values, output):
    return {axis: ctx.fresh(size) for axis, size in enumerate(output.shape) if size > 1}


@register_coupling_rule("torch.nn.functional.linear")
def _functional_linear_rule(ctx, vertex, module, layouts, values, output):
    x_index = _argument_input(module, 0, "input")
    w_index = _argument_input(module, 1, "weight")
    b_index = _argument_input(module, 2, "bias")
    if x_index is None or w_index is None:
        return _opaque(ctx, layouts, "functional linear with constant operands")
    x_layout = dict(_tensor_layout(layouts[x_index]))
    w_layout = _tensor_layout(layouts[w_index])
    last = values[x_index].ndim - 1
    in_atoms, w_in, w_out = x_layout.pop(last, None), w_layout.get(1), w_layout.get(0)
    if in_atoms is not None and w_in is not None:
        ctx.unify(in_atoms, w_in)
        ctx.consume(vertex, x_index, last, in_atoms)
    elif in_atoms is not None or w_in is not None:
        ctx.barrier(in_atoms if in_atoms is not None else w_in, "functional linear input")
    if w_out is None:
        return _opaque(ctx, layouts, "functional linear with a single output")
    ctx.mark_producer(w_out, last)
    if b_index is not None and _tensor_layout(layouts[b_index]).get(0) is not None:
        ctx.unify(w_out, layouts[b_index][0])
    factors = [w_out] + ([in_atoms] if in_atoms is not None else []) + list(x_layout.values())
    ctx.count_flops(vertex, _base_flops(vertex, values, output), factors)
    return {**x_layout, last: w_out}


# ------------------------------------------------------------------------------- pass-through
_PASS_THROUGH_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU, ops.SamePad2d, ops.StochasticDepth,
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)


@register_coupling_rule(*_PASS_THROUGH_MODULES, ops.PoolOp, ops.InterpolateOp, ops.PadOp)
def _pass_through_rule(ctx, vertex, module, layouts, values, output):
    """Channel-wise ops: the output has the first input's channels on the same axes."""
    first = next((i for i, v in enumerate(values) if isinstance(v, torch.Tensor)), None)
    if first is None:
        return None
    layout = _tensor_layout(layouts[first])
    for index, other in enumerate(layouts):  # extra tensor operands (weights) must not carry channels
        if index != first:
            ctx.barrier_layout(other, f"extra operand of {_describe(module)}")
    return dict(layout) if layout else None


@register_coupling_rule(ops.PointwiseOp)
def _pointwise_rule(ctx, vertex, module, layouts, values, output):
    tensors = [(_tensor_layout(layouts[i]), v) for i, v in enumerate(values)
               if isinstance(v, torch.Tensor)]
    if not isinstance(output, torch.Tensor):
        return _opaque(ctx, layouts, f"{module.function_name} returns no tensor")
    if module.short_name in ("type_as", "to", "expand_as") and len(tensors) > 1:
        tensors = tensors[:1]  # the second tensor only gives a dtype/device
    return _broadcast_axes(ctx, tensors, output.shape, f"{module.function_name} broadcast") or None


@register_coupling_rule(ops.ElementwiseOp)
def _elementwise_rule(ctx, vertex, module, layouts, values, output):
    if not isinstance(output, torch.Tensor):
        return None  # arithmetic on Python numbers (shapes)
    tensors = [(_tensor_layout(layouts[i]), v) for i, v in enumerate(values)
               if isinstance(v, torch.Tensor)]
    return _broadcast_axes(ctx, tensors, output.shape, "elementwise with untracked operand") or None


@register_coupling_rule(ops.ShapeQueryOp)
def _shape_query_rule(ctx, vertex, module, layouts, values, output):
    """Sizes read from channel axes carry those axes' atoms (see :class:`ShapeTag`)."""
    layout = _tensor_layout(layouts[0]) if layouts else {}
    if not layout or not isinstance(values[0], torch.Tensor):
        return None
    name = module.short_name

    def tag(axis):
        return ShapeTag(layout[axis]) if axis in layout else None

    if name == "getattr" and module.argument(1, None) == "shape" or (
            name == "size" and _argument_value(module, values, 1, "dim") is None):
        return tuple(tag(axis) for axis in range(values[0].ndim))
    if name == "size":
        return tag(_argument_value(module, values, 1, "dim") % values[0].ndim)
    if name in ("len", "__len__"):
        return tag(0)
    if name == "numel":
        ctx.barrier_layout(layout, "numel of a channel-tracked tensor")
    return None


# ------------------------------------------------------------------------------- norms
def _norm_over_last_axes(ctx, vertex, x_index, normalized_ndim, layouts, values, params):
    x_layout = _tensor_layout(layouts[x_index])
    ndim = values[x_index].ndim
    normalized_axes = list(range(ndim - normalized_ndim, ndim))
    tracked = [axis for axis in normalized_axes if axis in x_layout]
    param_layouts = [_tensor_layout(layouts[i]) for i in params if i is not None]
    if not tracked:
        for layout in param_layouts:
            ctx.barrier_layout(layout, "norm parameters of an untracked axis")
        return dict(x_layout) or None
    if normalized_ndim != 1:
        ctx.barrier_layout(x_layout, "normalisation over several axes")
        ctx.barrier_layout(param_layouts, "normalisation over several axes")
        return None
    atoms = x_layout[ndim - 1]
    for layout in param_layouts:
        if layout.get(0) is not None:
            ctx.unify(atoms, layout[0])
    ctx.consume(vertex, x_index, ndim - 1, atoms, kind="norm")
    return dict(x_layout)


@register_coupling_rule(nn.LayerNorm)
def _layer_norm_rule(ctx, vertex, module, layouts, values, output):
    return _norm_over_last_axes(ctx, vertex, 0, len(module.normalized_shape), layouts, values, [])


@register_coupling_rule("torch.nn.functional.layer_norm", "torch.layer_norm")
def _functional_layer_norm_rule(ctx, vertex, module, layouts, values, output):
    x_index = _argument_input(module, 0, "input")
    shape = _argument_value(module, values, 1, "normalized_shape")
    params = [_argument_input(module, 2, "weight"), _argument_input(module, 3, "bias")]
    if x_index is None or shape is None:
        return _opaque(ctx, layouts, "layer_norm with constant input")
    return _norm_over_last_axes(ctx, vertex, x_index, len(shape), layouts, values, params)


def _group_norm(ctx, vertex, x_index, num_groups, layouts, values, params):
    atoms = _channel_atoms(ctx, _tensor_layout(layouts[x_index]),
                           "group norm over a tracked spatial axis")
    param_layouts = [_tensor_layout(layouts[i]) for i in params if i is not None]
    if atoms is None:
        ctx.barrier_layout(param_layouts, "group norm of untracked channels")
        return None
    per_group = len(atoms) // num_groups
    for position in range(per_group):  # every group keeps the same channel positions
        ctx.tie(atoms[position::per_group])
    for layout in param_layouts:
        if layout.get(0) is not None:
            ctx.unify(atoms, layout[0])
    ctx.consume(vertex, x_index, 1, atoms, kind="norm")
    return {1: atoms}


@register_coupling_rule(nn.GroupNorm)
def _group_norm_rule(ctx, vertex, module, layouts, values, output):
    return _group_norm(ctx, vertex, 0, module.num_groups, layouts, values, [])


@register_coupling_rule("torch.nn.functional.group_norm", "torch.group_norm")
def _functional_group_norm_rule(ctx, vertex, module, layouts, values, output):
    x_index = _argument_input(module, 0, "input")
    groups = _argument_value(module, values, 1, "num_groups")
    params = [_argument_input(module, 2, "weight"), _argument_input(module, 3, "bias")]
    if x_index is None or not isinstance(groups, int):
        return _opaque(ctx, layouts, "group_norm with unusual arguments")
    return _group_norm(ctx, vertex, x_index, groups, layouts, values, params)


@register_coupling_rule("torch.nn.functional.batch_norm", "torch.batch_norm")
def _functional_batch_norm_rule(ctx, vertex, module, layouts, values, output):
    x_index = _argument_input(module, 0, "input")
    x_layout = dict(_tensor_layout(layouts[x_index])) if x_index is not None else {}
    for axis in [a for a in x_layout if a != 1]:  # statistics are taken over these axes
        ctx.barrier(x_layout.pop(axis), "batch-norm statistics over a channel axis")
    atoms = x_layout.get(1)
    for index, layout in enumerate(layouts):
        if index != x_index:
            param_atoms = _tensor_layout(layout).get(0)
            if param_atoms is None:
                continue
            if atoms is not None:
                ctx.unify(atoms, param_atoms)
            else:
                ctx.barrier(param_atoms, "batch norm of untracked channels")
    return dict(x_layout) or None


# ------------------------------------------------------------------------------- reductions
@register_coupling_rule(ops.ReductionOp)
def _reduction_rule(ctx, vertex, module, layouts, values, output):
    x_layout = _tensor_layout(layouts[0]) if values and isinstance(values[0], torch.Tensor) else {}
    if not isinstance(values[0], torch.Tensor) or not isinstance(output, torch.Tensor):
        return _opaque(ctx, layouts, f"{module.function_name} without a tensor result")
    ndim = values[0].ndim
    dims = _normalize_dims(_argument_value(module, values, 1, "dim"), ndim)
    keepdim = bool(_argument_value(module, values, 2, "keepdim", False))
    result = {}
    for axis, atoms in x_layout.items():
        if axis in dims:
            ctx.barrier(atoms, f"{module.short_name} over a channel axis")
        else:
            result[axis if keepdim else axis - sum(d < axis for d in dims)] = atoms
    return result or None


@register_coupling_rule(ops.SoftmaxOp, nn.Softmax)
def _softmax_rule(ctx, vertex, module, layouts, values, output):
    x_layout = _tensor_layout(layouts[0])
    dim = module.dim if isinstance(module, nn.Softmax) else _argument_value(module, values, 1, "dim")
    if dim is None:
        return _opaque(ctx, layouts, "softmax without dim")
    dim %= values[0].ndim
    if dim in x_layout:
        ctx.barrier(x_layout[dim], "softmax over a channel axis")
    return {axis: atoms for axis, atoms in x_layout.items() if axis != dim} or None


# ------------------------------------------------------------------------------- shape ops
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


_HEAD_LOOKAHEAD = 8  # vertices followed from a reshape to the attention that reads its heads


def _feeds_attention(ctx, vertex: InnerVertex) -> bool:
    """Whether ``vertex``'s output reaches an attention or batched matmul through ops that only
    move axes or act per element (permute, unbind, q/k norms, scaling), not through a reshape or
    a layer with weights."""
    frontier, seen = list(ctx.users.get(vertex, ())), set()
    while frontier and len(seen) < _HEAD_LOOKAHEAD:
        user = frontier.pop(0)
        if user in seen:
            continue
        seen.add(user)
        module = user.module
        if isinstance(module, (ops.AttentionOp, ops.MatmulOp)):
            return True
        has_weights = any(True for _ in module.parameters(recurse=False))
        if isinstance(module, ops.ReshapeOp) or (
                has_weights and not isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm))):
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


def _image_input(module, kind: type) -> int | None:
    return 0 if isinstance(module, kind) else _argument_input(module, 0, "input")


@register_coupling_rule(nn.Unfold, "torch.nn.functional.unfold")
def _unfold_rule(ctx, vertex, module, layouts, values, output):
    """im2col: output channel ``c * k*k + p`` is input channel ``c`` at kernel position ``p``."""
    x_index = _image_input(module, nn.Unfold)
    if x_index is None or values[x_index].ndim != 4 or output.ndim != 3:
        return _opaque(ctx, layouts, "unfold of an unbatched or constant input")
    atoms = _channel_atoms(ctx, _tensor_layout(layouts[x_index]),
                           "unfold over a channel-tracked spatial axis")
    if atoms is None:
        return None
    return {1: np.repeat(atoms, output.shape[1] // len(atoms))}


@register_coupling_rule(nn.Fold, "torch.nn.functional.fold")
def _fold_rule(ctx, vertex, module, layouts, values, output):
    """col2im: output channel ``c`` sums input channels ``c * k*k`` to ``c * k*k + k*k - 1``."""
    x_index = _image_input(module, nn.Fold)
    if x_index is None or values[x_index].ndim != 3 or output.ndim != 4:
        return _opaque(ctx, layouts, "fold of an unbatched or constant input")
    atoms = _channel_atoms(ctx, _tensor_layout(layouts[x_index]),
                           "fold over a channel-tracked position axis")
    if atoms is None:
        return None
    per_channel = atoms.reshape(output.shape[1], -1)
    for summed in per_channel:  # summed together: kept or removed together
        ctx.tie(summed)
    return {1: np.ascontiguousarray(per_channel[:, 0])}


def _size_arguments(module, ndim: int) -> list:
    """The size argument given for each output axis of view/reshape/expand (or [])."""
    if not isinstance(module, ops.FunctionalOp) or module.short_name not in ("view", "reshape", "expand"):
        return []
    keyword = {"view": "size", "reshape": "shape", "expand": "size"}[module.short_name]
    sizes = module.argument(1, keyword)
    if not isinstance(sizes, (tuple, list)):
        sizes = module.args[1:]
    return list(sizes) if len(sizes) == ndim else []


def whole_size_input(module) -> int | None:
    """The input holding the whole size tuple of view/reshape/expand (``x.expand(y.shape)``;
    not ``x.expand(B, -1)``, whose first size alone is an input)."""
    if not isinstance(module, ops.FunctionalOp) or module.short_name not in ("view", "reshape", "expand"):
        return None
    keyword = {"view": "size", "reshape": "shape", "expand": "size"}[module.short_name]
    sizes = module.argument(1, keyword)
    whole = isinstance(sizes, InputRef) and (keyword in module.kwargs or len(module.args) == 2)
    return sizes.index if whole else None


def _couple_sizes(ctx, module, layouts, result: Layout, ndim: int, unify_tracked: bool) -> Layout:
    """Couples output axes with the channel axes their run-time sizes were read from.

    A size shaping an axis that carries no channels, or another number of them, bars the axis it
    was read from (and that output axis). An axis carrying as many channels is unified with the size's
    axis only with ``unify_tracked`` (expand); a reshape's size there becomes the kept count at
    removal, so the axis it was read from (a residual stream's ``C`` shaping the merged
    attention heads) is pruned on its own."""
    result = dict(result or {})
    tags = [layouts[size.index] if isinstance(size, InputRef) else None
            for size in _size_arguments(module, ndim)]
    whole = whole_size_input(module)
    if whole is not None and isinstance(layouts[whole], tuple) and len(layouts[whole]) == ndim:
        tags = list(layouts[whole])  # one tag per output axis
    else:
        whole = None
    for axis, tag in enumerate(tags):
        if not isinstance(tag, ShapeTag):
            continue
        atoms = result.get(axis)
        if atoms is not None and len(atoms) == len(tag.atoms):
            if unify_tracked:
                ctx.unify(atoms, tag.atoms)
        else:
            ctx.barrier(tag.atoms, "size read from a channel axis shapes an untracked axis")
            if atoms is not None:
                ctx.barrier(atoms, "shaped by a size read from another axis")
                result.pop(axis)
    for index, layout in enumerate(layouts):  # tags used any other way
        if index != whole and isinstance(layout, tuple) and _is_size_layout(layout):
            ctx.barrier_layout(layout, "shape tuple passed whole")
    return result


@register_coupling_rule(ops.ReshapeOp, nn.Flatten, nn.Unflatten, reads_sizes=True)
def _reshape_rule(ctx, vertex, module, layouts, values, output):
    x_index = _argument_input(module, 0, "input") if isinstance(module, ops.FunctionalOp) else 0
    if x_index is None or not isinstance(output, torch.Tensor):
        return _opaque(ctx, layouts, "reshape of a constant")
    other_tensors = [i for i, v in enumerate(values) if i != x_index and isinstance(v, torch.Tensor)]
    for index in other_tensors:  # view_as / reshape_as: the template's axes match the output's
        ctx.barrier_layout(layouts[index], "reshape template tensor")
    layout = _tensor_layout(layouts[x_index])
    splits_heads = ctx.head_pruning == "heads" and _feeds_attention(ctx, vertex)
    result = (_reshape_layout(ctx, layout, tuple(values[x_index].shape), tuple(output.shape), splits_heads)
              if layout else None)
    if other_tensors and result:
        ctx.barrier_layout(result, "reshaped like another tensor")
        result = None
    return _couple_sizes(ctx, module, layouts, result, output.ndim, unify_tracked=False) or None


def _permutation(module, values, ndim) -> list[int] | None:
    name = module.short_name
    if name in ("permute",):
        dims = [a for a in module.args[1:]] if len(module.args) > 2 or not isinstance(
            module.argument(1, "dims"), (tuple, list)) else list(module.argument(1, "dims"))
        if any(not isinstance(d, int) for d in dims):
            return None
        return [d % ndim for d in dims]
    if name in ("transpose", "swapaxes"):
        first, second = module.argument(1, "dim0"), module.argument(2, "dim1")
        if not isinstance(first, int) or not isinstance(second, int):
            return None
        order = list(range(ndim))
        order[first % ndim], order[second % ndim] = order[second % ndim], order[first % ndim]
        return order
    if name == "t":
        return list(range(ndim))[::-1]
    if name in ("movedim", "moveaxis"):
        source, destination = module.argument(1, "source"), module.argument(2, "destination")
        if not isinstance(source, int) or not isinstance(destination, int):
            return None
        order = list(range(ndim))
        order.insert(destination % ndim, order.pop(source % ndim))
        return order
    return None


@register_coupling_rule(ops.PermuteOp)
def _permute_rule(ctx, vertex, module, layouts, values, output):
    layout = _tensor_layout(layouts[0])
    order = _permutation(module, values, values[0].ndim)
    if order is None:
        return _opaque(ctx, layouts, f"{module.function_name} with dynamic axes")
    return {new: layout[old] for new, old in enumerate(order) if old in layout} or None


@register_coupling_rule(ops.ExpandOp, reads_sizes=True)
def _expand_rule(ctx, vertex, module, layouts, values, output):
    layout = _tensor_layout(layouts[0])
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
    return _couple_sizes(ctx, module, layouts, result, output.ndim, unify_tracked=True) or None


@register_coupling_rule(ops.ConcatOp)
def _concat_rule(ctx, vertex, module, layouts, values, output):
    tensors = module.argument(0, "tensors")
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, InputRef) for t in tensors):
        return _opaque(ctx, layouts, "concatenation of a computed list")
    dim = _argument_value(module, values, 1, "dim", 0)
    parts = [(_tensor_layout(layouts[t.index]), values[t.index]) for t in tensors]
    stacking = module.short_name == "stack"
    ndim = output.ndim
    dim %= ndim
    result = {}
    if not stacking:
        pieces = [layout.get(dim) for layout, _ in parts]
        if any(piece is not None for piece in pieces):
            filled = []
            for piece, (_, value) in zip(pieces, parts):
                if piece is None:
                    piece = ctx.fresh(value.shape[dim])
                    ctx.barrier(piece, "concatenated with an untracked tensor")
                filled.append(piece)
            result[dim] = np.concatenate(filled)
    for axis in range(ndim):
        if axis == dim:
            continue
        source_axis = axis if not stacking or axis < dim else axis - 1
        tracked = [layout.get(source_axis) for layout, _ in parts]
        present = [atoms for atoms in tracked if atoms is not None]
        if not present:
            continue
        if len(present) < len(tracked):
            for atoms in present:
                ctx.barrier(atoms, "concatenated beside an untracked tensor")
            continue
        for atoms in present[1:]:
            ctx.unify(present[0], atoms)
        result[axis] = present[0]
    return result or None


@register_coupling_rule(ops.SplitOp)
def _split_rule(ctx, vertex, module, layouts, values, output):
    layout = _tensor_layout(layouts[0])
    if not isinstance(output, (tuple, list)):
        return _opaque(ctx, layouts, "split without a tuple result")
    ndim = values[0].ndim
    dim_position = 1 if module.short_name == "unbind" else 2
    dim = _argument_value(module, values, dim_position, "dim", 0) % ndim
    pieces = []
    start = 0
    for piece in output:
        size = 1 if module.short_name == "unbind" else piece.shape[dim]
        piece_layout = {}
        for axis, atoms in layout.items():
            if axis == dim:
                if module.short_name == "unbind":
                    ctx.barrier(atoms, "unbind of a channel axis")
                    continue
                piece_layout[axis] = atoms[start:start + size]
            else:
                piece_layout[axis - 1 if module.short_name == "unbind" and axis > dim else axis] = atoms
        pieces.append(piece_layout or None)
        start += size
    return tuple(pieces)


@register_coupling_rule(ops.GetItemOp, reads_sizes=True)
def _getitem_rule(ctx, vertex, module, layouts, values, output):
    container, index = values[0], _argument_value(module, values, 1, None)
    layout = layouts[0]
    if not isinstance(container, torch.Tensor):
        if isinstance(container, (tuple, list)) and isinstance(index, int) and isinstance(layout, (tuple, list)):
            return layout[index]
        if isinstance(layout, (tuple, list)) and isinstance(index, slice):
            return type(layout)(layout[index])
        return None
    layout = _tensor_layout(layout)
    if isinstance(index, torch.Tensor) and not index.dtype.is_floating_point and index.dtype != torch.bool:
        return _gather_rows(ctx, layouts, layout, index)
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(item, (torch.Tensor, list)) or isinstance(item, InputRef) for item in items):
        return _opaque(ctx, layouts, "advanced indexing")
    explicit = sum(1 for item in items if item is not None and item is not Ellipsis)
    result, in_axis, out_axis = {}, 0, 0
    for item in items:
        if item is Ellipsis:
            skipped = container.ndim - explicit
            for _ in range(skipped):
                if in_axis in layout:
                    result[out_axis] = layout[in_axis]
                in_axis, out_axis = in_axis + 1, out_axis + 1
        elif item is None:
            out_axis += 1
        elif isinstance(item, int):
            if in_axis in layout:
                ctx.barrier(layout[in_axis], "integer index into a channel axis")
            in_axis += 1
        elif isinstance(item, slice):
            if in_axis in layout:
                if any(bound is not None and not isinstance(bound, int)
                       for bound in (item.start, item.stop, item.step)):
                    # e.g. pit's x[:, :token_length], token_length read from a shape at run time
                    ctx.barrier(layout[in_axis], "slice of a channel axis with run-time bounds")
                elif item.step not in (None, 1):
                    ctx.barrier(layout[in_axis], "strided slice of a channel axis")
                else:
                    result[out_axis] = layout[in_axis][item]
            in_axis, out_axis = in_axis + 1, out_axis + 1
        else:
            return _opaque(ctx, layouts, f"index {item!r}")
    while in_axis < container.ndim:
        if in_axis in layout:
            result[out_axis] = layout[in_axis]
        in_axis, out_axis = in_axis + 1, out_axis + 1
    return result or None


def _gather_rows(ctx, layouts: list, layout: Layout, index: torch.Tensor) -> Layout | None:
    """``x[index]`` with an integer tensor: rows of axis 0 are gathered (a relative position
    table indexed by pair), the other axes keep their channels, shifted behind the index's axes."""
    for other in layouts[1:]:
        ctx.barrier_layout(other, "a channel axis used as an index")
    if 0 in layout:
        ctx.barrier(layout[0], "rows of a channel axis gathered by an index")
    return {axis - 1 + index.ndim: atoms for axis, atoms in layout.items() if axis > 0} or None


# ------------------------------------------------------------------------------- products
@register_coupling_rule(*ops.MatmulOp.function_names)
def _matmul_rule(ctx, vertex, module, layouts, values, output):
    a_index, b_index = _argument_input(module, 0, "input"), _argument_input(module, 1, "other")
    if b_index is None:
        b_index = _argument_input(module, 1, "mat2")
    if a_index is None or b_index is None or values[a_index].ndim < 2 or values[b_index].ndim < 2:
        return _opaque(ctx, layouts, "matmul of vectors or constants")
    a, b = values[a_index], values[b_index]
    a_layout, b_layout = _tensor_layout(layouts[a_index]), _tensor_layout(layouts[b_index])
    contraction_a, contraction_b = a_layout.get(a.ndim - 1), b_layout.get(b.ndim - 2)
    factors = []
    if contraction_a is not None and contraction_b is not None:
        ctx.unify(contraction_a, contraction_b)
        ctx.consume(vertex, a_index, a.ndim - 1, contraction_a)
        factors.append(contraction_a)
    elif contraction_a is not None or contraction_b is not None:
        ctx.barrier(contraction_a if contraction_a is not None else contraction_b,
                    "matmul contraction with an untracked operand")
    batch_a = {axis: atoms for axis, atoms in a_layout.items() if axis < a.ndim - 2}
    batch_b = {axis: atoms for axis, atoms in b_layout.items() if axis < b.ndim - 2}
    batch_shape = output.shape[:-2]
    result = _broadcast_axes(ctx, [(batch_a, a[..., 0, 0]), (batch_b, b[..., 0, 0])], batch_shape,
                             "matmul batch axes") if batch_shape else {}
    if a.ndim - 2 in a_layout:
        result[output.ndim - 2] = a_layout[a.ndim - 2]
    if b.ndim - 1 in b_layout:
        result[output.ndim - 1] = b_layout[b.ndim - 1]
    factors.extend(result.values())
    ctx.count_flops(vertex, _base_flops(vertex, values, output), factors)
    return result or None


@register_coupling_rule(ops.AttentionOp)
def _attention_rule(ctx, vertex, module, layouts, values, output):
    q_index, k_index, v_index = (_argument_input(module, 0, "query"), _argument_input(module, 1, "key"),
                                 _argument_input(module, 2, "value"))
    if None in (q_index, k_index, v_index):
        return _opaque(ctx, layouts, "attention with constant operands")
    q, k, v = values[q_index], values[k_index], values[v_index]
    q_layout, k_layout, v_layout = (_tensor_layout(layouts[i]) for i in (q_index, k_index, v_index))
    masks = []  # an additive or boolean mask broadcasts over the batch and head axes
    for index, layout in enumerate(layouts):
        if index in (q_index, k_index, v_index):
            continue
        value = values[index]
        if isinstance(value, torch.Tensor) and 2 <= value.ndim <= q.ndim:
            layout = _tensor_layout(layout)
            ctx.barrier_layout({a: t for a, t in layout.items() if a >= value.ndim - 2}, "attention mask")
            masks.append(({a: t for a, t in layout.items() if a < value.ndim - 2}, value[..., 0, 0]))
        else:
            ctx.barrier_layout(layout, "attention mask")
    head_q, head_k = q_layout.get(q.ndim - 1), k_layout.get(k.ndim - 1)
    score_factors = []
    if head_q is not None and head_k is not None:
        ctx.unify(head_q, head_k)
        ctx.consume(vertex, q_index, q.ndim - 1, head_q)
        score_factors.append(head_q)
    elif head_q is not None or head_k is not None:
        ctx.barrier(head_q if head_q is not None else head_k, "attention with untracked q or k")
    for layout, value in ((k_layout, k), (v_layout, v)):
        if value.ndim - 2 in layout:
            ctx.barrier(layout[value.ndim - 2], "attention over a channel-tracked token axis")
    batch = [({a: t for a, t in layout.items() if a < value.ndim - 2}, value[..., 0, 0])
             for layout, value in ((q_layout, q), (k_layout, k), (v_layout, v))]
    result = (_broadcast_axes(ctx, batch + masks, output.shape[:-2], "attention batch axes")
              if output.ndim > 2 else {})
    head_factors = list(result.values())  # whole heads, when they are pruned
    if q.ndim - 2 in q_layout:
        result[output.ndim - 2] = q_layout[q.ndim - 2]
    value_factors = []
    if v.ndim - 1 in v_layout:
        result[output.ndim - 1] = v_layout[v.ndim - 1]
        value_factors.append(v_layout[v.ndim - 1])
    scores = q.numel() // q.shape[-1] * k.shape[-2]
    ctx.count_flops(vertex, 2 * scores * q.shape[-1], score_factors + head_factors)
    ctx.count_flops(vertex, 2 * scores * output.shape[-1], value_factors + head_factors)
    return result or None
