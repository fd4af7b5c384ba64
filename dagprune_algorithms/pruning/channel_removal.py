"""Removing channels for real: per-op slicing handlers and the removal pass.

Given a :class:`~dagprune_algorithms.pruning.channel_groups.ChannelAnalysis` and the set of
kept channel classes, :func:`remove_channels_from_dag` builds a new plain DAG in which every
vertex's parameters are sliced and every shape constant (reshape sizes, split sizes, slices,
norm shapes) is rewritten for the kept channels. Handlers are registered per module type, op
family or function name with :func:`register_channel_removal`.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dagprune import DagModule, InnerVertex, InputVertex, ops
from dagprune.errors import PruningError
from dagprune.ops import InputRef

from dagprune_algorithms.pruning.channel_groups import ChannelAnalysis
from dagprune_algorithms.pruning.coupling_rules import whole_size_input

__all__ = ["register_channel_removal", "remove_channels_from_dag", "position_masks"]

RemovalHandler = Callable[..., nn.Module]
_HANDLERS: dict[Any, RemovalHandler] = {}


def register_channel_removal(*keys):
    """Registers ``handler(module, input_masks, output_mask, values_shapes) -> module``.

    ``input_masks[i]`` / ``output_mask`` map axis -> boolean numpy array of kept positions (only
    axes that lose positions appear). The handler returns the module to use in the slim DAG
    (a sliced copy, or the module itself when nothing changes).
    """
    def decorator(handler: RemovalHandler) -> RemovalHandler:
        for key in keys:
            _HANDLERS[key] = handler
        return handler
    return decorator


def position_masks(layout: Any, keep_class: np.ndarray, keep_full: bool = False) -> Any:
    """Per-axis kept-position masks for a layout; axes that keep everything are omitted unless
    ``keep_full`` (then every channel-carrying axis has a mask)."""
    if isinstance(layout, dict):
        masks = {axis: keep_class[atoms] for axis, atoms in layout.items()}
        return {axis: mask for axis, mask in masks.items() if keep_full or not mask.all()}
    if isinstance(layout, (tuple, list)):
        return type(layout)(position_masks(item, keep_class, keep_full) for item in layout)
    return {}


def _is_empty(masks: Any) -> bool:
    if isinstance(masks, dict):
        return not masks
    if isinstance(masks, (tuple, list)):
        return all(_is_empty(m) for m in masks)
    return True


def remove_channels_from_dag(analysis: ChannelAnalysis, keep_class: np.ndarray) -> DagModule:
    """A new DAG computing ``analysis.dag`` with only the kept channel classes.

    Args:
        analysis: the channel analysis of the (ungated) DAG.
        keep_class: boolean array over classes (indexed by class id); True = kept.
    """
    dag = analysis.dag
    new_vertices: dict[Any, Any] = {}
    inputs = []
    for vertex in dag.inputs:
        new_vertex = InputVertex(vertex.name, vertex.default)
        new_vertices[vertex] = new_vertex
        inputs.append(new_vertex)
    inner = []
    for vertex in dag.inner_vertices:
        # a reshape's run-time sizes of channel axes (``C`` read from another tensor's shape)
        # can be wrong even where its own channels are all kept: its handler sees every such axis
        full = isinstance(vertex.module, ops.ReshapeOp)
        input_masks = [position_masks(analysis.layouts[p], keep_class, full) for p in vertex.predecessors]
        output_mask = position_masks(analysis.layouts[vertex], keep_class)
        shapes = [analysis.values_shapes[p] for p in vertex.predecessors] + [analysis.values_shapes[vertex]]
        module = vertex.module
        if not (_is_empty(output_mask) and all(_is_empty(m) for m in input_masks)):
            handler = ops.handler_for(_HANDLERS, module)
            if handler is None:
                raise PruningError(
                    f"vertex {vertex.name!r} ({type(module).__name__}) loses channels but has no "
                    "removal handler; register one with register_channel_removal")
            module = handler(module, input_masks, output_mask, shapes)
        else:
            module = copy.deepcopy(module)
        new_vertex = InnerVertex(vertex.name, module, [new_vertices[p] for p in vertex.predecessors],
                                 vertex.qualified_name)
        new_vertices[vertex] = new_vertex
        inner.append(new_vertex)
    slim = DagModule(inputs, inner, [new_vertices[v] for v in dag.output_vertices],
                     copy.deepcopy(dag.output_structure), name=dag.name)
    slim.train(dag.training)
    slim.lint()
    return slim


# ------------------------------------------------------------------------------- helpers
def _index(mask: np.ndarray | None, size: int, device) -> torch.Tensor:
    if mask is None:
        return torch.arange(size, device=device)
    return torch.as_tensor(np.flatnonzero(mask), device=device)


def _slice_tensor(tensor: torch.Tensor, axis: int, mask: np.ndarray | None) -> torch.Tensor:
    if mask is None:
        return tensor
    return tensor.index_select(axis, _index(mask, tensor.shape[axis], tensor.device))


def _replace(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    if tensor is None:
        return
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(tensor.detach().clone(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, tensor.detach().clone())


def _count(mask: np.ndarray | None, size: int) -> int:
    return size if mask is None else int(mask.sum())


# ------------------------------------------------------------------------------- layers
@register_channel_removal(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _remove_conv(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    in_mask, out_mask = input_masks[0].get(1), output_mask.get(1)
    groups = module.groups
    weight = _slice_tensor(module.weight, 0, out_mask)
    if groups == 1:
        weight = _slice_tensor(weight, 1, in_mask)
    else:  # whole groups go (input and output channels of a group are tied)
        per_group = module.out_channels // groups
        module.groups = _count(out_mask, module.out_channels) // per_group
    _replace(module, "weight", weight)
    if module.bias is not None:
        _replace(module, "bias", _slice_tensor(module.bias, 0, out_mask))
    _slice_extra_output_state(module, module.out_channels, out_mask)
    module.out_channels = _count(out_mask, module.out_channels)
    module.in_channels = _count(in_mask, module.in_channels)
    return module


@register_channel_removal(ops.StandardizedConv2d)
def _remove_standardized_conv(module, input_masks, output_mask, shapes):
    """Output channels (and whole conv groups) go without changing any kept filter's
    statistics; removing input channels of an ungrouped layer would, so that layer becomes a
    plain conv holding the standardised weight, sliced."""
    if module.groups == 1 and input_masks[0].get(1) is not None:
        module = module.to_plain_conv()
    return _remove_conv(module, input_masks, output_mask, shapes)


def _slice_extra_output_state(module: nn.Module, out_channels: int, out_mask) -> None:
    """Per-output-channel tensors of conv subclasses (e.g. timm's weight-standardised convs
    keep a ``gain`` of shape (out, 1, 1, 1))."""
    if out_mask is None:
        return
    named = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    for name, tensor in named:
        if name not in ("weight", "bias") and tensor is not None and tensor.ndim >= 1 \
                and tensor.shape[0] == out_channels:
            _replace(module, name, _slice_tensor(tensor, 0, out_mask))


@register_channel_removal(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _remove_conv_transpose(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    in_mask, out_mask = input_masks[0].get(1), output_mask.get(1)
    groups = module.groups
    weight = _slice_tensor(module.weight, 0, in_mask)  # (in, out / groups, k...)
    if groups == 1:
        weight = _slice_tensor(weight, 1, out_mask)
    else:
        per_group = module.in_channels // groups
        module.groups = _count(in_mask, module.in_channels) // per_group
    _replace(module, "weight", weight)
    if module.bias is not None:
        _replace(module, "bias", _slice_tensor(module.bias, 0, out_mask))
    module.out_channels = _count(out_mask, module.out_channels)
    module.in_channels = _count(in_mask, module.in_channels)
    return module


@register_channel_removal(nn.Linear)
def _remove_linear(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    last = len(shapes[0]) - 1
    in_mask, out_mask = input_masks[0].get(last), output_mask.get(last)
    _replace(module, "weight", _slice_tensor(_slice_tensor(module.weight, 0, out_mask), 1, in_mask))
    if module.bias is not None:
        _replace(module, "bias", _slice_tensor(module.bias, 0, out_mask))
    module.in_features = _count(in_mask, module.in_features)
    module.out_features = _count(out_mask, module.out_features)
    return module


def _slice_per_channel_state(module: nn.Module, mask: np.ndarray | None) -> nn.Module:
    module = copy.deepcopy(module)
    for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if tensor is not None and tensor.ndim == 1 and mask is not None and tensor.shape[0] == len(mask):
            _replace(module, name, _slice_tensor(tensor, 0, mask))
    return module


@register_channel_removal(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _remove_batch_norm(module, input_masks, output_mask, shapes):
    mask = output_mask.get(1)
    module = _slice_per_channel_state(module, mask)
    module.num_features = _count(mask, module.num_features)
    return module


@register_channel_removal(nn.PReLU)
def _remove_prelu(module, input_masks, output_mask, shapes):
    if module.num_parameters == 1:
        return copy.deepcopy(module)
    mask = output_mask.get(1)
    module = _slice_per_channel_state(module, mask)
    module.num_parameters = _count(mask, module.num_parameters)
    return module


@register_channel_removal(nn.LayerNorm)
def _remove_layer_norm(module, input_masks, output_mask, shapes):
    mask = output_mask.get(len(shapes[0]) - 1)
    module = _slice_per_channel_state(module, mask)
    module.normalized_shape = (_count(mask, module.normalized_shape[0]),)
    return module


@register_channel_removal(nn.GroupNorm)
def _remove_group_norm(module, input_masks, output_mask, shapes):
    mask = output_mask.get(1)
    module = _slice_per_channel_state(module, mask)
    module.num_channels = _count(mask, module.num_channels)
    return module


@register_channel_removal(ops.ParameterOp)
def _remove_parameter(module, input_masks, output_mask, shapes):
    value = module.value
    for axis, mask in output_mask.items():
        value = _slice_tensor(value, axis, mask)
    return ops.ParameterOp(nn.Parameter(value.detach().clone(), requires_grad=module.value.requires_grad)
                           if module.trainable else value.detach().clone(), trainable=module.trainable)


# ------------------------------------------------------------------------------- ops
_CHANNELWISE = (
    ops.ElementwiseOp, ops.PointwiseOp, ops.PoolOp, ops.InterpolateOp, ops.PadOp, ops.SamePad2d, ops.StochasticDepth,
    ops.ConcatOp, ops.PermuteOp, ops.ReductionOp, ops.SoftmaxOp, ops.MatmulOp, ops.ShapeQueryOp,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d,
    nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.Flatten, nn.Softmax,
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)


@register_channel_removal(*_CHANNELWISE)
def _unchanged(module, input_masks, output_mask, shapes):
    """Channel-wise ops hold nothing per channel: the same op works on fewer channels."""
    return copy.deepcopy(module)


# im2col / col2im hold no per-channel state either; their sizes are spatial.
register_channel_removal(nn.Unfold, nn.Fold, "torch.nn.functional.unfold",
                         "torch.nn.functional.fold")(_unchanged)


def _new_shape(shape, output_mask) -> list[int]:
    return [_count(output_mask.get(axis), size) for axis, size in enumerate(shape)]


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
    from dagprune_algorithms.pruning.coupling_rules import reshape_axis_groups

    masked = input_masks[0] if isinstance(input_masks[0], dict) else {}
    # The batch axis is 1 in the analysis, so it joins the channels it is merged with; an output
    # axis 0 holding it (BottleneckAttn's q.reshape(B * heads, dim_head, -1)) stays run-time.
    return frozenset(axis for in_axes, out_axes in reshape_axis_groups(in_shape, out_shape)
                     if any(a in masked for a in in_axes) for axis in out_axes
                     if not (axis == 0 and 0 in in_axes))


@register_channel_removal(ops.ReshapeOp)
def _remove_reshape(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    old_shape = shapes[-1]
    new_shape = _new_shape(old_shape, output_mask)
    name = module.short_name
    if name in ("view", "reshape"):
        keyword = "shape" if name == "reshape" else "size"
        static = _channel_derived_axes(shapes[0], old_shape, input_masks)
        shape_argument = module.argument(1, keyword)
        if isinstance(shape_argument, (tuple, list)):
            module.set_argument(1, keyword, _rewrite_sizes(shape_argument, new_shape, old_shape, static))
        elif whole_size_input(module) is not None:
            pass  # a whole run-time shape (x.view(y.shape)): y's channel axes are coupled
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


@register_channel_removal(nn.Unflatten)
def _remove_unflatten_module(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    dim = module.dim % len(shapes[0])
    count = len(module.unflattened_size)
    module.unflattened_size = tuple(_rewrite_sizes(list(module.unflattened_size),
                                                   _new_shape(shapes[-1], output_mask)[dim:dim + count],
                                                   shapes[-1][dim:dim + count]))
    return module


@register_channel_removal(ops.ExpandOp)
def _remove_expand(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    if module.short_name == "expand":
        new_shape = _new_shape(shapes[-1], output_mask)
        sizes = module.argument(1, "size")
        if isinstance(sizes, (tuple, list)):
            module.set_argument(1, "size", _rewrite_sizes(sizes, new_shape, shapes[-1]))
        elif whole_size_input(module) is not None:
            pass  # a whole run-time shape (x.expand(y.shape)): y's channel axes are coupled
        else:
            module.args = (module.args[0], *_rewrite_sizes(list(module.args[1:]), new_shape, shapes[-1]))
    return module


@register_channel_removal(ops.SplitOp)
def _remove_split(module, input_masks, output_mask, shapes):
    if module.short_name == "unbind":  # never unbinds a channel axis (a barrier): same op works;
        return copy.deepcopy(module)   # rewriting it as split would keep the unbound axis
    ndim = len(shapes[0])
    dim_position = 1 if module.short_name == "unbind" else 2
    dim = module.argument(dim_position, "dim", 0) % ndim
    pieces = [_count(piece.get(dim), shape[dim]) for piece, shape in zip(output_mask, shapes[-1])]
    namespace = "Tensor" if module.function_name.startswith("Tensor.") else "torch"
    return ops.SplitOp(f"{namespace}.split", (module.args[0], pieces), {"dim": dim})


@register_channel_removal(ops.GetItemOp)
def _remove_getitem(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    in_masks = input_masks[0]
    if not isinstance(in_masks, dict) or not in_masks:
        return module
    index = module.argument(1, None)
    items = list(index) if isinstance(index, tuple) else [index]
    ndim = len(shapes[0])
    explicit = sum(1 for item in items if item is not None and item is not Ellipsis)
    in_axis, rewritten = 0, []
    for item in items:
        if item is Ellipsis:
            in_axis += ndim - explicit
        elif isinstance(item, slice):
            mask = in_masks.get(in_axis)
            if mask is not None:
                start, stop, _ = item.indices(len(mask))
                item = slice(int(mask[:start].sum()), int(mask[:stop].sum()), None)
            in_axis += 1
        elif isinstance(item, int):
            in_axis += 1
        rewritten.append(item)
    module.set_argument(1, None, tuple(rewritten) if isinstance(index, tuple) else rewritten[0])
    return module


@register_channel_removal("torch.nn.functional.layer_norm", "torch.layer_norm")
def _remove_functional_layer_norm(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    x_shape = shapes[0]
    mask = output_mask.get(len(x_shape) - 1)
    shape = module.argument(1, "normalized_shape")
    if mask is not None and isinstance(shape, (tuple, list)) and isinstance(shape[-1], int):
        module.set_argument(1, "normalized_shape", type(shape)([*shape[:-1], int(mask.sum())]))
    return module


@register_channel_removal("torch.nn.functional.group_norm", "torch.group_norm",
                          "torch.nn.functional.batch_norm", "torch.batch_norm",
                          "torch.nn.functional.linear")
def _remove_functional_with_parameter_inputs(module, input_masks, output_mask, shapes):
    return copy.deepcopy(module)  # the parameters are ParameterOp inputs, sliced on their own


@register_channel_removal(ops.AttentionOp)
def _remove_attention(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    if module.argument(None, "scale") is None and len(module.args) < 7:
        module.kwargs["scale"] = 1.0 / math.sqrt(shapes[0][-1])  # keep the original scaling
    return module
