"""Fully connected layers: nn.Linear, F.linear (weights as inputs) and torch.addmm."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dagprune.ops.channel_map import argument_input, argument_value, broadcast_axes, tensor_layout
from dagprune.ops.slicing import kept_count, replace_tensor, slice_tensor, unchanged_removal
from dagprune.ops.spec import ChannelWeight, OpSpec, opaque_coupling
from dagprune.ops.specs.products import add_matmul_coupling, added_scores_example

__all__ = ["SPECS"]


def linear_flops(module: nn.Linear, inputs, output) -> int:
    return 2 * output.numel() * module.in_features


def functional_linear_flops(module, inputs, output) -> int:
    weight = argument_value(module, inputs, 1, "weight")
    return 2 * output.numel() * weight.shape[-1]


def addmm_flops(module, inputs, output) -> int:
    """``addmm(bias, mat1, mat2)``: the product only, like :func:`linear_flops`."""
    first = argument_value(module, inputs, 1, "mat1")
    return 2 * output.numel() * first.shape[-1]


def linear_coupling(ctx, vertex, module, layouts, values, output):
    """The last axis: input features consumed, output features new; other axes pass."""
    x_layout = dict(tensor_layout(layouts[0]))
    last = values[0].ndim - 1
    in_atoms = x_layout.pop(last, None)
    if in_atoms is not None:
        ctx.consume(vertex, 0, last, in_atoms)
    out_atoms = ctx.produce(module.out_features, axis=last)
    factors = [out_atoms] + ([in_atoms] if in_atoms is not None else []) + list(x_layout.values())
    ctx.count_flops(vertex, linear_flops(module, values, output), factors)
    return {**x_layout, last: out_atoms}


def functional_linear_coupling(ctx, vertex, module, layouts, values, output):
    """``F.linear(x, weight, bias)`` with the weight a parameter read in the graph: its rows
    are the output channels (the parameter's atoms become this vertex's produced channels)."""
    x_index, w_index = argument_input(module, 0, "input"), argument_input(module, 1, "weight")
    b_index = argument_input(module, 2, "bias")
    if x_index is None or w_index is None:
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    x_layout = dict(tensor_layout(layouts[x_index]))
    w_layout = tensor_layout(layouts[w_index])
    last = values[x_index].ndim - 1
    in_atoms, w_in, w_out = x_layout.pop(last, None), w_layout.get(1), w_layout.get(0)
    if in_atoms is not None and w_in is not None:
        ctx.unify(in_atoms, w_in)
        ctx.consume(vertex, x_index, last, in_atoms)
    elif in_atoms is not None or w_in is not None:
        ctx.barrier(in_atoms if in_atoms is not None else w_in, "functional linear input")
    if w_out is None:
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    ctx.mark_producer(w_out, last)
    if b_index is not None and tensor_layout(layouts[b_index]).get(0) is not None:
        ctx.unify(w_out, layouts[b_index][0])
    factors = [w_out] + ([in_atoms] if in_atoms is not None else []) + list(x_layout.values())
    ctx.count_flops(vertex, functional_linear_flops(module, values, output), factors)
    return {**x_layout, last: w_out}


def remove_from_linear(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    last = len(shapes[0]) - 1
    in_mask, out_mask = input_masks[0].get(last), output_mask.get(last)
    replace_tensor(module, "weight", slice_tensor(slice_tensor(module.weight, 0, out_mask), 1, in_mask))
    if module.bias is not None:
        replace_tensor(module, "bias", slice_tensor(module.bias, 0, out_mask))
    module.in_features = kept_count(in_mask, module.in_features)
    module.out_features = kept_count(out_mask, module.out_features)
    return module


def mask_linear_input(layer: nn.Linear, inputs, mask: torch.Tensor, axis: int) -> torch.Tensor:
    """``layer(x * mask)``, computed by scaling whichever is smaller: the input or the weight."""
    x = inputs[0]
    if x.numel() <= layer.weight.numel() or type(layer) is not nn.Linear:  # a subclass's own forward
        return layer(x * mask)
    return F.linear(x, layer.weight * mask, layer.bias)


def linear_filters(module, vertex) -> ChannelWeight:
    return ChannelWeight(module.weight, 0)


def functional_linear_filters(module, vertex) -> ChannelWeight | None:
    """The weight parameter read by the vertex feeding the weight argument."""
    weight = module.argument(1, "weight")
    value = getattr(vertex.predecessors[weight.index].module, "value", None) \
        if hasattr(weight, "index") else None
    return ChannelWeight(value, 0) if isinstance(value, torch.Tensor) else None


def bilinear_flops(module: nn.Bilinear, inputs, output) -> int:
    """``y_k = x1 W_k x2``: per row, a (in1 x in2) product for each output, then its sum."""
    rows = inputs[0].numel() // module.in1_features
    return 2 * rows * module.weight.numel()


def bilinear_coupling(ctx, vertex, module, layouts, values, output):
    """``nn.Bilinear(x1, x2)``: both inputs' features (last axis) consumed, output features new;
    the leading axes are the same rows in both inputs and the output."""
    last = values[0].ndim - 1
    first, second = dict(tensor_layout(layouts[0])), dict(tensor_layout(layouts[1]))
    consumed = [(index, layout.pop(last, None)) for index, layout in ((0, first), (1, second))]
    for index, atoms in consumed:
        if atoms is not None:
            ctx.consume(vertex, index, last, atoms)
    rows = broadcast_axes(ctx, [(first, values[0][..., 0]), (second, values[1][..., 0])],
                          output.shape[:-1], "bilinear rows with an untracked operand")
    out_atoms = ctx.produce(module.out_features, axis=last)
    factors = [out_atoms] + [atoms for _, atoms in consumed if atoms is not None] + list(rows.values())
    ctx.count_flops(vertex, bilinear_flops(module, values, output), factors)
    return {**rows, last: out_atoms}


def remove_from_bilinear(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    last = len(shapes[0]) - 1
    first, second, out_mask = input_masks[0].get(last), input_masks[1].get(last), output_mask.get(last)
    weight = slice_tensor(slice_tensor(slice_tensor(module.weight, 0, out_mask), 1, first), 2, second)
    replace_tensor(module, "weight", weight)
    if module.bias is not None:
        replace_tensor(module, "bias", slice_tensor(module.bias, 0, out_mask))
    module.in1_features, module.in2_features = kept_count(first, module.in1_features), kept_count(
        second, module.in2_features)
    module.out_features = kept_count(out_mask, module.out_features)
    return module


class _BilinearPooling(nn.Module):
    """Two projections of the features combined by a bilinear layer."""

    def __init__(self):
        super().__init__()
        self.left, self.right, self.join, self.head = nn.Linear(6, 5), nn.Linear(6, 4), nn.Bilinear(5, 4, 7), \
            nn.Linear(7, 2)

    def forward(self, x):
        return self.head(torch.relu(self.join(torch.relu(self.left(x)), torch.tanh(self.right(x)))))


def _linear_example():
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)), (torch.randn(2, 5, 6),)


class _FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.weight = nn.Linear(6, 8), nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        return F.linear(self.first(x), self.weight)


SPECS = (
    OpSpec("linear", (nn.Linear,), flops=linear_flops, coupling=linear_coupling,
           removal=remove_from_linear, masking=mask_linear_input, importance=linear_filters,
           example=_linear_example),
    # the weight and bias are ParameterOp inputs, sliced by their own spec
    OpSpec("functional_linear", ("torch.nn.functional.linear",), flops=functional_linear_flops,
           coupling=functional_linear_coupling, removal=unchanged_removal,
           importance=functional_linear_filters,
           example=lambda: (_FunctionalLinear(), (torch.randn(2, 6),))),
    OpSpec("addmm", ("torch.addmm",), flops=addmm_flops, coupling=add_matmul_coupling,
           removal=unchanged_removal, example=added_scores_example),
    OpSpec("bilinear", (nn.Bilinear,), flops=bilinear_flops, coupling=bilinear_coupling,
           removal=remove_from_bilinear, importance=linear_filters,
           example=lambda: (_BilinearPooling(), (torch.randn(3, 6),))),
)
