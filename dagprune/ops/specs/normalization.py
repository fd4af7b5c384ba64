"""Normalisation layers: batch, instance, layer and group norm, as modules and functions.

Per-channel norms (batch and instance norm) pass channels through; norms whose statistics mix
channels (layer norm over the channel axis, group norm) *consume* them: in the gated model
their statistics count only kept channels (the masking facet), so that removing the channels
gives the same output. RMSNorm has its own file (:mod:`dagprune.ops.specs.rms_norm`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dagprune.ops.channel_map import (ShapeTag, along_axis, argument_input, argument_value, channel_atoms,
                                      operand_layout, same_in_every_row, tensor_layout,
                                      tie_positions_across_groups, whole_in_every_row)
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.group_moments import masked_group_mean
from dagprune.ops.layers import NormOp
from dagprune.ops.slicing import kept_count, slice_per_channel_state, unchanged_removal
from dagprune.ops.spec import ChannelWeight, OpSpec, opaque_coupling
from dagprune.ops.templates import InputRef

__all__ = ["SPECS", "norm_over_last_axes", "norm_scale", "scaled_affine", "pass_through_coupling",
           "couple_normalized_shape", "shrink_normalized_shape", "layer_norm_coupling",
           "remove_from_layer_norm", "group_norm_over_channels"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_F = "torch.nn.functional."
_DEFAULT_EPS = 1e-5  # eps of F.layer_norm / F.group_norm when the call gives none


def pass_through_coupling(ctx, vertex, module, layouts, values, output):
    """Channel-wise ops: the output has the first input's channels on the same axes; other
    tensor operands (weights) must not carry channels."""
    first = next((i for i, v in enumerate(values) if isinstance(v, torch.Tensor)), None)
    if first is None:
        return None
    layout = operand_layout(ctx, vertex, layouts, first)
    return dict(layout) if layout else None


# ------------------------------------------------------------------------------- coupling
def norm_over_last_axes(ctx, vertex, x_index, normalized_ndim, layouts, values, params):
    """Couples a norm over the last ``normalized_ndim`` axes: over one channel axis, its
    statistics consume the channels and its parameters (input indices ``params``) follow them."""
    x_layout = tensor_layout(layouts[x_index])
    ndim = values[x_index].ndim
    tracked = [axis for axis in range(ndim - normalized_ndim, ndim) if axis in x_layout]
    param_layouts = [tensor_layout(layouts[i]) for i in params if i is not None]
    if not tracked:
        ctx.barrier_layout(param_layouts, "norm parameters of an untracked axis")
        return dict(x_layout) or None
    if normalized_ndim != 1:
        ctx.barrier_layout([x_layout, param_layouts], "normalisation over several axes")
        return None
    atoms = x_layout[ndim - 1]
    for layout in param_layouts:
        if layout.get(0) is not None:
            ctx.unify(atoms, layout[0])
    ctx.consume(vertex, x_index, ndim - 1, atoms, kind="norm")
    return dict(x_layout)


def couple_normalized_shape(ctx, module, layouts, x_layout: dict, ndim: int) -> None:
    """Sizes in a functional norm's ``normalized_shape`` read at run time from channel axes
    (``F.rms_norm(x, (x.shape[-1],))``) are those axes' channels: they are unified with the
    normalised axes they stand for (after removal they read the kept count by themselves)."""
    template = module.argument(1, "normalized_shape")
    if isinstance(template, InputRef) and isinstance(layouts[template.index], tuple):
        tags = list(layouts[template.index])
    else:
        items = template if isinstance(template, (tuple, list)) else (template,)
        tags = [layouts[item.index] if isinstance(item, InputRef) else None for item in items]
    for offset, tag in enumerate(reversed(tags)):
        if not isinstance(tag, ShapeTag):
            continue
        atoms = x_layout.get(ndim - 1 - offset)
        if atoms is not None and len(atoms) == len(tag.atoms) and not tag.is_derived:
            ctx.unify(atoms, tag.atoms)
        else:
            ctx.barrier(tag.all_atoms, "normalized_shape read from another axis")


def layer_norm_coupling(ctx, vertex, module, layouts, values, output):
    """A norm module over its ``normalized_shape`` (LayerNorm, RMSNorm)."""
    return norm_over_last_axes(ctx, vertex, 0, len(module.normalized_shape), layouts, values, [])


def functional_layer_norm_coupling(ctx, vertex, module, layouts, values, output):
    x_index = argument_input(module, 0, "input")
    shape = argument_value(module, values, 1, "normalized_shape")
    if x_index is None or shape is None:
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    params = [argument_input(module, 2, "weight"), argument_input(module, 3, "bias")]
    couple_normalized_shape(ctx, module, layouts, tensor_layout(layouts[x_index]), values[x_index].ndim)
    return norm_over_last_axes(ctx, vertex, x_index, len(shape), layouts, values, params)


def group_norm_over_channels(ctx, vertex, x_index, num_groups, layouts, params):
    """Couples a norm with statistics over ``num_groups`` groups of the channels (axis 1): the
    statistics consume the channels and the parameters (input indices ``params``) follow them.

    Removal keeps a group norm valid two ways: every group keeps the same positions (the
    number of groups stays), or whole groups go (it shrinks). Where the rest of the model keeps
    or removes each group whole (a grouped convolution with the same groups), whole groups go.
    Otherwise the finer of the two is chosen: the same positions when a group holds at least
    as many channels as there are groups (``GroupNorm(32, 1024)``: 32 classes of 32 channels),
    whole groups when there are more groups than channels in each (``GroupNorm(256, 512)``:
    256 classes of 2 channels rather than 2 of 256)."""
    atoms = channel_atoms(ctx, tensor_layout(layouts[x_index]), "group norm over a tracked spatial axis")
    param_layouts = [tensor_layout(layouts[i]) for i in params if i is not None]
    if atoms is None:
        ctx.barrier_layout(param_layouts, "group norm of untracked channels")
        return None
    ctx.defer(lambda class_of: _tie_group_positions_unless_whole(ctx, atoms, num_groups, class_of))
    for layout in param_layouts:
        if layout.get(0) is not None:
            ctx.unify(atoms, layout[0])
    ctx.consume(vertex, x_index, 1, atoms, kind="norm")
    return {1: atoms}


def _tie_group_positions_unless_whole(ctx, atoms, num_groups: int, class_of) -> None:
    grouped = np.asarray(atoms).reshape(num_groups, -1)
    if whole_in_every_row(class_of(grouped)):
        return  # each group is kept or removed whole
    if num_groups > grouped.shape[1]:
        tie_positions_across_groups(ctx, grouped.T)  # each group's channels together: whole groups
    else:
        tie_positions_across_groups(ctx, grouped)


def kept_groups(mask, num_groups: int) -> int:
    """The number of groups a group norm keeps under a channel ``mask``: all of them when each
    keeps as many channels, else those kept whole (the coupling allows nothing else)."""
    if mask is None:
        return num_groups
    rows = np.asarray(mask).reshape(num_groups, -1)
    kept = rows.sum(axis=1)
    if same_in_every_row(kept):
        return num_groups
    if not np.isin(kept, (0, rows.shape[1])).all():
        raise ValueError(f"group norm channel mask keeps {kept.tolist()} channels of its {num_groups} groups")
    return int((kept > 0).sum())


def group_norm_coupling(ctx, vertex, module, layouts, values, output):
    return group_norm_over_channels(ctx, vertex, 0, module.num_groups, layouts, [])


def functional_group_norm_coupling(ctx, vertex, module, layouts, values, output):
    x_index = argument_input(module, 0, "input")
    groups = argument_value(module, values, 1, "num_groups")
    if x_index is None or not isinstance(groups, int):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    params = [argument_input(module, 2, "weight"), argument_input(module, 3, "bias")]
    return group_norm_over_channels(ctx, vertex, x_index, groups, layouts, params)


def functional_batch_norm_coupling(ctx, vertex, module, layouts, values, output):
    """Channels on axis 1 pass; parameters and statistics (inputs) follow them."""
    x_index = argument_input(module, 0, "input")
    x_layout = dict(tensor_layout(layouts[x_index])) if x_index is not None else {}
    for axis in [a for a in x_layout if a != 1]:  # statistics are taken over these axes
        ctx.barrier(x_layout.pop(axis), "batch-norm statistics over a channel axis")
    atoms = x_layout.get(1)
    for index, layout in enumerate(layouts):
        param_atoms = tensor_layout(layout).get(0) if index != x_index else None
        if param_atoms is None:
            continue
        if atoms is not None:
            ctx.unify(atoms, param_atoms)
        else:
            ctx.barrier(param_atoms, "batch norm of untracked channels")
    return dict(x_layout) or None


def functional_normalize_coupling(ctx, vertex, module, layouts, values, output):
    """``F.normalize(x, p=2, dim)``: the norm over ``dim`` mixes that axis' channels (consumed,
    with statistics over the kept ones); every channel passes through to the output."""
    x_index = argument_input(module, 0, "input")
    p = argument_value(module, values, 1, "p", 2.0)
    dim = argument_value(module, values, 2, "dim", 1)
    if x_index is None or p not in (2, 2.0) or not isinstance(dim, int):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    x_layout = tensor_layout(layouts[x_index])
    axis = dim % values[x_index].ndim
    if axis in x_layout:
        ctx.consume(vertex, x_index, axis, x_layout[axis], kind="norm")
    return dict(x_layout) or None


# ------------------------------------------------------------------------------- removal
def _slice_channels_on_axis_1(module, output_mask, count_attribute: str):
    mask = output_mask.get(1)
    module = slice_per_channel_state(module, mask)
    setattr(module, count_attribute, kept_count(mask, getattr(module, count_attribute)))
    return module


def remove_from_batch_norm(module, input_masks, output_mask, shapes):
    return _slice_channels_on_axis_1(module, output_mask, "num_features")


def remove_from_layer_norm(module, input_masks, output_mask, shapes):
    """A norm module over the last axis (LayerNorm, RMSNorm): its weight (and bias) and its
    ``normalized_shape`` shrink."""
    mask = output_mask.get(len(shapes[0]) - 1)
    module = slice_per_channel_state(module, mask)
    module.normalized_shape = (kept_count(mask, module.normalized_shape[0]),)
    return module


def remove_from_group_norm(module, input_masks, output_mask, shapes):
    groups = kept_groups(output_mask.get(1), module.num_groups)
    module = _slice_channels_on_axis_1(module, output_mask, "num_channels")
    module.num_groups = groups
    return module


def remove_from_functional_group_norm(module, input_masks, output_mask, shapes):
    """``F.group_norm(x, num_groups, ...)``: the number of groups shrinks where whole groups go
    (its weight and bias are ParameterOp inputs, sliced by their own spec)."""
    groups = module.argument(1, "num_groups")
    kept = kept_groups(output_mask.get(1), groups)
    if kept == groups:
        return module
    module = copy.deepcopy(module)
    module.set_argument(1, "num_groups", kept)
    return module


def shrink_normalized_shape(module, input_masks, output_mask, shapes):
    """A functional norm over the last axis: its ``normalized_shape`` argument shrinks (its
    weight and bias are ParameterOp inputs, sliced by their own spec)."""
    module = copy.deepcopy(module)
    mask = output_mask.get(len(shapes[0]) - 1)
    shape = module.argument(1, "normalized_shape")
    if mask is not None and isinstance(shape, (tuple, list)) and isinstance(shape[-1], int):
        module.set_argument(1, "normalized_shape", type(shape)([*shape[:-1], int(mask.sum())]))
    return module


# ------------------------------------------------------------------------------- masking
def _affine(y, weight, bias, shape):
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def scaled_affine(weight, bias, scale):
    """``weight`` and ``bias`` times a per-channel ``scale`` (None: unchanged); a missing
    weight becomes the scale itself."""
    if scale is None:
        return weight, bias
    return (scale if weight is None else weight * scale), (None if bias is None else bias * scale)


def masked_layer_norm(x, mask, weight, bias, eps, output_scale=None) -> torch.Tensor:
    """Layer norm over the last axis with statistics over the kept (mask-weighted) channels,
    its output multiplied by ``output_scale`` (per channel) when given.

    Mask-weighted mean and variance as products with the normalised mask: two passes (exact in
    float32 where E[x^2] - mean^2 would cancel), few full-size ops like native layer_norm; the
    output is contiguous in x's logical layout (channels-last activations stay channels-last).
    """
    weight, bias = scaled_affine(weight, bias, output_scale)
    x = x.contiguous()
    weights = mask / mask.sum()
    if _fused_path(x, weights, weight, bias):
        return _MaskedLayerNorm.apply(x, weights, weight, bias, eps)
    centered = x - (x @ weights).unsqueeze(-1)
    var = (centered * centered) @ weights
    y = centered * torch.rsqrt(var + eps).unsqueeze(-1)
    if weight is not None and bias is not None:
        return torch.addcmul(bias, y, weight)
    return _affine(y, weight, bias, [x.shape[-1]])


def _fused_path(x, weights, weight, bias) -> bool:
    """Whether :class:`_MaskedLayerNorm` computes the masked layer norm: float32/64 inputs
    with an affine weight and bias outside autocast (elsewhere the composed ops run, in the
    dtypes autocast picks)."""
    tensors = (x, weights, weight, bias)
    return (x.dtype in (torch.float32, torch.float64) and weight is not None and bias is not None
            and all(t.dtype == x.dtype and t.device == x.device for t in tensors)
            and not torch.is_autocast_enabled(x.device.type))


class _MaskedLayerNorm(torch.autograd.Function):
    """The masked layer norm with its gradient written out: the same two-pass statistics as
    the composed ops, with about half their kernel launches per training step.

    With ``w`` the normalised mask, ``y = (x - mean) * r``, ``r = (var + eps) ** -0.5``,
    ``g = grad_out * weight``, ``A = sum(g)`` and ``B = sum(g * y)`` over the channels:
    ``grad_x = r * (g - w * (A + y * B))`` and
    ``grad_w = -sum over rows of (y * A + r * mean * A + y^2 * B / 2)``.
    """

    @staticmethod
    def forward(ctx, x, weights, weight, bias, eps):
        mean = x @ weights
        centered = x - mean.unsqueeze(-1)
        rstd = torch.rsqrt((centered * centered) @ weights + eps)
        y = centered.mul_(rstd.unsqueeze(-1))
        ctx.save_for_backward(y, rstd, mean, weights, weight)
        return torch.addcmul(bias, y, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        y, rstd, mean, weights, weight = ctx.saved_tensors
        channels = y.shape[-1]
        grad_out = grad_out.contiguous()
        rows_out, rows_y = grad_out.view(-1, channels), y.view(-1, channels)
        products = rows_out * rows_y
        grad_weight = products.sum(0) if ctx.needs_input_grad[2] else None
        grad_bias = rows_out.sum(0) if ctx.needs_input_grad[3] else None
        a, b = rows_out @ weight, products @ weight
        # A + B * y, as a product and an in-place sum: addcmul with two per-row (R, 1) operands
        # takes a slow unvectorised path on CPU (about 5x a plain product)
        correction = torch.mul(rows_y, b.unsqueeze(-1)).add_(a.unsqueeze(-1))
        grad_weights = None
        if ctx.needs_input_grad[1]:  # sum(y * A + y^2 * B / 2) = (sum(y * correction) + sum(y * A)) / 2
            y_correction = torch.mul(rows_y, correction, out=products)  # products is read no more
            grad_weights = -(0.5 * (y_correction.sum(0) + a @ rows_y) + (rstd.reshape(-1) * mean.reshape(-1)) @ a)
        grad_x = None
        if ctx.needs_input_grad[0]:  # in correction's memory: r * (g - w * correction)
            grad_x = correction.mul_(-weights).addcmul_(rows_out, weight).mul_(rstd.reshape(-1, 1)).view_as(y)
        return grad_x, grad_weights, grad_weight, grad_bias, None


def masked_group_norm(x, mask, groups, weight, bias, eps) -> torch.Tensor:
    """Group norm (channels on axis 1) with statistics over the kept channels of each group."""
    batch, channels = x.shape[0], x.shape[1]
    grouped = x.reshape(batch, groups, channels // groups, -1)
    weights = mask.view(1, groups, channels // groups, 1)
    mean = masked_group_mean(grouped, weights)
    var = masked_group_mean((grouped - mean) ** 2, weights)
    y = ((grouped - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return _affine(y, weight, bias, [1, channels] + [1] * (x.ndim - 2))


def mask_layer_norm(norm, inputs, mask, axis, output_scale=None):
    return masked_layer_norm(inputs[0], mask, norm.weight, norm.bias, norm.eps, output_scale)


def mask_functional_layer_norm(op, inputs, mask, axis, output_scale=None):
    value = lambda position, keyword, default=None: argument_value(op, inputs, position, keyword, default)  # noqa: E731
    return masked_layer_norm(value(0, "input"), mask, value(2, "weight"), value(3, "bias"),
                             value(4, "eps", _DEFAULT_EPS), output_scale)


def mask_functional_normalize(op, inputs, mask, axis):
    """``x / max(||x||, eps)`` with the 2-norm over the kept (mask-weighted) channels of ``axis``."""
    x = argument_value(op, inputs, 0, "input")
    eps = argument_value(op, inputs, 3, "eps", 1e-12)
    weights = along_axis(mask, axis, x.ndim)
    norm = ((x * x) * weights).sum(axis, keepdim=True).sqrt()
    return x / norm.clamp_min(eps)


def mask_group_norm(norm, inputs, mask, axis):
    return masked_group_norm(inputs[0], mask, norm.num_groups, norm.weight, norm.bias, norm.eps)


def mask_functional_group_norm(op, inputs, mask, axis):
    value = lambda position, keyword, default=None: argument_value(op, inputs, position, keyword, default)  # noqa: E731
    return masked_group_norm(value(0, "input"), mask, value(1, "num_groups"), value(2, "weight"),
                             value(3, "bias"), value(4, "eps", _DEFAULT_EPS))


# ------------------------------------------------------------------------------- importance
def norm_scale(module, vertex) -> ChannelWeight | None:
    """The norm's per-channel scale (its affine weight), when it has one."""
    weight = getattr(module, "weight", None)
    return ChannelWeight(weight, 0, kind="scale") if isinstance(weight, torch.Tensor) else None


def _norm_example(norm: nn.Module, channels_last: bool = False):
    def example():
        if channels_last:
            return nn.Sequential(nn.Linear(5, 8), norm, nn.Linear(8, 3)), (torch.randn(2, 4, 5),)
        return nn.Sequential(nn.Conv2d(3, 8, 1), norm, nn.Conv2d(8, 3, 1)), (torch.randn(2, 3, 4, 4),)
    return example


class _FunctionalNorms(nn.Module):
    """Functional layer, group, instance and batch norm with parameters read in the graph."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)
        self.scale, self.shift = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))
        self.register_buffer("mean", torch.randn(8))
        self.register_buffer("var", torch.rand(8) + 0.5)

    def forward(self, x):
        x = F.batch_norm(self.conv(x), self.mean, self.var, self.scale, self.shift)
        x = F.group_norm(F.instance_norm(x, weight=self.scale, bias=self.shift), 4, self.scale, self.shift)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (8,), self.scale, self.shift).permute(0, 3, 1, 2)
        return self.head(x)


class _CosineAttention(nn.Module):
    """Cosine-similarity attention (Swin V2): q and k normalised over their head dims."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        q, k = F.normalize(self.q(x), dim=-1), F.normalize(self.k(x), dim=-1)
        return self.out((q @ k.transpose(-2, -1)).softmax(-1) @ self.v(x))


def _cosine_attention_example():
    return _CosineAttention(), (torch.randn(2, 5, 6),)


def _functional_example():
    return _FunctionalNorms(), (torch.randn(2, 3, 4, 4),)


SPECS = (
    OpSpec("batch_norm", _BATCH_NORMS, flops=no_flops, coupling=pass_through_coupling,
           removal=remove_from_batch_norm, importance=norm_scale,
           example=_norm_example(nn.BatchNorm2d(8))),
    OpSpec("instance_norm", _INSTANCE_NORMS, flops=no_flops, coupling=pass_through_coupling,
           removal=remove_from_batch_norm, importance=norm_scale,
           example=_norm_example(nn.InstanceNorm2d(8, affine=True))),
    OpSpec("layer_norm", (nn.LayerNorm,), flops=no_flops, coupling=layer_norm_coupling,
           removal=remove_from_layer_norm, masking=mask_layer_norm, scales_output=True,
           importance=norm_scale, example=_norm_example(nn.LayerNorm(8), channels_last=True)),
    OpSpec("group_norm", (nn.GroupNorm,), flops=no_flops, coupling=group_norm_coupling,
           removal=remove_from_group_norm, masking=mask_group_norm, importance=norm_scale,
           example=_norm_example(nn.GroupNorm(2, 8))),
    OpSpec("functional_layer_norm", (_F + "layer_norm", "torch.layer_norm"), flops=no_flops,
           coupling=functional_layer_norm_coupling, removal=shrink_normalized_shape,
           masking=mask_functional_layer_norm, scales_output=True, reads_sizes=True,
           example=_functional_example),
    OpSpec("functional_group_norm", (_F + "group_norm", "torch.group_norm"), flops=no_flops,
           coupling=functional_group_norm_coupling, removal=remove_from_functional_group_norm,
           masking=mask_functional_group_norm, example=_functional_example),
    OpSpec("functional_batch_norm", (_F + "batch_norm", "torch.batch_norm"), flops=no_flops,
           coupling=functional_batch_norm_coupling, removal=unchanged_removal,
           example=_functional_example),
    OpSpec("functional_normalize", (_F + "normalize",), flops=no_flops, coupling=functional_normalize_coupling,
           removal=unchanged_removal, masking=mask_functional_normalize, example=_cosine_attention_example),
    OpSpec("functional_instance_norm", (_F + "instance_norm", "torch.instance_norm"), flops=no_flops,
           coupling=functional_batch_norm_coupling, removal=unchanged_removal, example=_functional_example),
    # other functional norms: statistics over axes the call decides; not followed
    OpSpec("functional_norm", (NormOp,), flops=no_flops, coupling=opaque_coupling),
)
