"""Products of tensors: matmul / bmm / ``@``, scaled dot-product attention (einsum: :mod:`.einsum`)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dagprune.ops.channel_map import (argument_input, argument_value, broadcast_axes,
                                      tensor_layout)
from dagprune.ops.linear_algebra import AddMatmulOp, AttentionOp, MatmulOp
from dagprune.ops.slicing import unchanged_removal
from dagprune.ops.spec import OpSpec, opaque_coupling

__all__ = ["SPECS", "add_matmul_coupling", "added_scores_example", "contraction_flops", "unify_contraction"]


# ------------------------------------------------------------------------------- flops
def contraction_flops(first, output) -> int:
    """A product's multiply-adds: each output element contracts ``first``'s last axis."""
    if not isinstance(first, torch.Tensor) or not isinstance(output, torch.Tensor):
        return 0
    return 2 * output.numel() * first.shape[-1]


def matmul_flops(module, inputs, output) -> int:
    return contraction_flops(argument_value(module, inputs, 0, "input"), output)


def _attention_scores(query, key) -> int:
    return query.numel() // query.shape[-1] * key.shape[-2]  # (..., L, S)


def attention_flops(module, inputs, output) -> int:
    query, key = inputs[0], inputs[1]
    return 2 * _attention_scores(query, key) * (query.shape[-1] + output.shape[-1])


# ------------------------------------------------------------------------------- coupling
def _matmul_operands(module) -> tuple[int | None, int | None]:
    b_index = argument_input(module, 1, "other")
    return argument_input(module, 0, "input"), b_index if b_index is not None else argument_input(module, 1, "mat2")


def unify_contraction(ctx, vertex, first: tuple, second: tuple, reason: str) -> list:
    """Unifies two contracted axes (``(input index, axis, atoms)`` each); returns the factors."""
    (index, axis, atoms), (_, _, other) = first, second
    if atoms is not None and other is not None:
        ctx.unify(atoms, other)
        ctx.consume(vertex, index, axis, atoms)
        return [atoms]
    if atoms is not None or other is not None:
        ctx.barrier(atoms if atoms is not None else other, reason)
    return []


def _batch_layout(layout, value):
    return {a: t for a, t in layout.items() if a < value.ndim - 2}, value[..., 0, 0]


def matmul_coupling(ctx, vertex, module, layouts, values, output):
    a_index, b_index = _matmul_operands(module)
    if a_index is None or b_index is None or values[a_index].ndim < 2 or values[b_index].ndim < 2:
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    return _product_coupling(ctx, vertex, layouts, values, output, a_index, b_index)


def _add_matmul_operands(module) -> tuple[int | None, int | None, int | None]:
    batched = module.short_name == "baddbmm"
    return (argument_input(module, 0, "input"), argument_input(module, 1, "batch1" if batched else "mat1"),
            argument_input(module, 2, "batch2" if batched else "mat2"))


def add_matmul_flops(module, inputs, output) -> int:
    _, a_index, _ = _add_matmul_operands(module)
    return 0 if a_index is None else contraction_flops(inputs[a_index], output)


def add_matmul_coupling(ctx, vertex, module, layouts, values, output):
    """``baddbmm`` / ``addmm``: the product couples like a matmul; the added input combines
    with its result elementwise (an untracked added axis bars the channels it meets)."""
    input_index, a_index, b_index = _add_matmul_operands(module)
    if None in (input_index, a_index, b_index) or not isinstance(values[input_index], torch.Tensor):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    product = _product_coupling(ctx, vertex, layouts, values, output, a_index, b_index)
    return broadcast_axes(ctx, [(product or {}, output), (tensor_layout(layouts[input_index]), values[input_index])],
                          output.shape, f"{module.short_name} added input") or None


def _product_coupling(ctx, vertex, layouts, values, output, a_index: int, b_index: int):
    """The channel map of ``values[a_index] @ values[b_index]`` (see :func:`matmul_coupling`)."""
    a, b = values[a_index], values[b_index]
    a_layout, b_layout = tensor_layout(layouts[a_index]), tensor_layout(layouts[b_index])
    factors = unify_contraction(ctx, vertex, (a_index, a.ndim - 1, a_layout.get(a.ndim - 1)),
                                (b_index, b.ndim - 2, b_layout.get(b.ndim - 2)),
                                "matmul contraction with an untracked operand")
    batch_shape = output.shape[:-2]
    result = broadcast_axes(ctx, [_batch_layout(a_layout, a), _batch_layout(b_layout, b)],
                            batch_shape, "matmul batch axes") if batch_shape else {}
    if a.ndim - 2 in a_layout:
        result[output.ndim - 2] = a_layout[a.ndim - 2]
    if b.ndim - 1 in b_layout:
        result[output.ndim - 1] = b_layout[b.ndim - 1]
    factors.extend(result.values())
    ctx.count_flops(vertex, 2 * output.numel() * a.shape[-1], factors)
    return result or None


def _cdist_operands(module) -> tuple[int | None, int | None]:
    return argument_input(module, 0, "x1"), argument_input(module, 1, "x2")


def cdist_flops(module, inputs, output) -> int:
    """A difference, a power and a sum per feature of each pair."""
    a_index, _ = _cdist_operands(module)
    return 0 if a_index is None else 3 * contraction_flops(inputs[a_index], output) // 2


def cdist_coupling(ctx, vertex, module, layouts, values, output):
    """``torch.cdist(a, b)``: the features (last axis) of ``a`` and ``b`` are one set of
    channels, summed over like a matmul's contraction; the gated model masks both operands (a
    removed feature, 0 in both, adds nothing to any p-norm distance). The output's rows and
    columns carry ``a``'s and ``b``'s second-last axes."""
    a_index, b_index = _cdist_operands(module)
    if a_index is None or b_index is None or not isinstance(output, torch.Tensor):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    a, b = values[a_index], values[b_index]
    a_layout, b_layout = tensor_layout(layouts[a_index]), tensor_layout(layouts[b_index])
    factors = unify_contraction(ctx, vertex, (a_index, a.ndim - 1, a_layout.get(a.ndim - 1)),
                                (b_index, b.ndim - 1, b_layout.get(b.ndim - 1)),
                                "cdist features with an untracked operand")
    if factors:  # a removed feature must be 0 in both operands (a product needs it in one)
        ctx.consume(vertex, b_index, b.ndim - 1, factors[0])
    batch_shape = output.shape[:-2]
    result = broadcast_axes(ctx, [_batch_layout(a_layout, a), _batch_layout(b_layout, b)],
                            batch_shape, "cdist batch axes") if batch_shape else {}
    for source, layout, out_axis in ((a, a_layout, output.ndim - 2), (b, b_layout, output.ndim - 1)):
        if source.ndim - 2 in layout:
            result[out_axis] = layout[source.ndim - 2]
    factors.extend(result.values())
    ctx.count_flops(vertex, cdist_flops(module, values, output), factors)
    return result or None


class _Prototypes(nn.Module):
    """Distances of embedded samples to learned prototypes (prototypical networks)."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(6, 8), nn.Linear(4, 2)
        self.prototypes = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return self.head(torch.cdist(self.embed(x), self.prototypes.expand(x.shape[0], -1, -1)))


def _attention_masks(ctx, layouts, values, qkv: tuple, query) -> list:
    """Additive or boolean masks broadcast over the batch and head axes: their token axes are
    barriers; their head axes join the attention's head axes."""
    masks = []
    for index, layout in enumerate(layouts):
        if index in qkv:
            continue
        value = values[index]
        if isinstance(value, torch.Tensor) and 2 <= value.ndim <= query.ndim:
            layout = tensor_layout(layout)
            ctx.barrier_layout({a: t for a, t in layout.items() if a >= value.ndim - 2}, "attention mask")
            masks.append(_batch_layout(layout, value))
        else:
            ctx.barrier_layout(layout, "attention mask")
    return masks


def attention_coupling(ctx, vertex, module, layouts, values, output):
    """q and k head dims are the same channels; v's head dims pass to the output; batch and
    head axes broadcast (whole heads go together when heads are pruned)."""
    qkv = (argument_input(module, 0, "query"), argument_input(module, 1, "key"),
           argument_input(module, 2, "value"))
    if None in qkv:
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    (q, k, v), (q_layout, k_layout, v_layout) = ([values[i] for i in qkv],
                                                 [tensor_layout(layouts[i]) for i in qkv])
    masks = _attention_masks(ctx, layouts, values, qkv, q)
    score_factors = unify_contraction(ctx, vertex, (qkv[0], q.ndim - 1, q_layout.get(q.ndim - 1)),
                                      (qkv[1], k.ndim - 1, k_layout.get(k.ndim - 1)),
                                      "attention with untracked q or k")
    for layout, value in ((k_layout, k), (v_layout, v)):
        if value.ndim - 2 in layout:
            ctx.barrier(layout[value.ndim - 2], "attention over a channel-tracked token axis")
    batch = [_batch_layout(layout, value) for layout, value in ((q_layout, q), (k_layout, k), (v_layout, v))]
    result = (broadcast_axes(ctx, batch + masks, output.shape[:-2], "attention batch axes")
              if output.ndim > 2 else {})
    head_factors = list(result.values())
    if q.ndim - 2 in q_layout:
        result[output.ndim - 2] = q_layout[q.ndim - 2]
    value_factors = []
    if v.ndim - 1 in v_layout:
        result[output.ndim - 1] = v_layout[v.ndim - 1]
        value_factors.append(v_layout[v.ndim - 1])
    scores = _attention_scores(q, k)
    ctx.count_flops(vertex, 2 * scores * q.shape[-1], score_factors + head_factors)
    ctx.count_flops(vertex, 2 * scores * output.shape[-1], value_factors + head_factors)
    return result or None


def remove_from_attention(module, input_masks, output_mask, shapes):
    """Fewer head dims would change the default ``1 / sqrt(head_dim)`` scale: it is fixed."""
    module = copy.deepcopy(module)
    if module.argument(None, "scale") is None and len(module.args) < 7:
        module.kwargs["scale"] = 1.0 / math.sqrt(shapes[0][-1])
    return module


class _Attention(nn.Module):
    def __init__(self, use_sdpa: bool):
        super().__init__()
        self.qkv, self.proj, self.use_sdpa = nn.Linear(8, 24), nn.Linear(8, 8), use_sdpa

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8))


class _AddedScores(nn.Module):
    """Attention scores with an added bias through ``baddbmm``, and an ``addmm`` head."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.key = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
        self.bias, self.shift = nn.Parameter(torch.randn(5, 5)), nn.Parameter(torch.randn(5, 5))

    def forward(self, x):
        scores = torch.baddbmm(self.bias, self.q(x), self.k(x).transpose(1, 2), alpha=0.5)
        mixed = scores.softmax(-1) @ self.v(x)
        return torch.addmm(self.shift, mixed[0], self.key(x)[0].T)


def added_scores_example():
    return _AddedScores(), (torch.randn(2, 5, 6),)


SPECS = (
    OpSpec("add_matmul", (AddMatmulOp,), flops=add_matmul_flops, coupling=add_matmul_coupling,
           removal=unchanged_removal, example=added_scores_example),
    OpSpec("matmul", (MatmulOp,), flops=matmul_flops, coupling=matmul_coupling,
           removal=unchanged_removal, example=lambda: (_Attention(False), (torch.randn(1, 5, 8),))),
    OpSpec("cdist", ("torch.cdist",), flops=cdist_flops, coupling=cdist_coupling, removal=unchanged_removal,
           example=lambda: (_Prototypes(), (torch.randn(2, 5, 6),))),
    OpSpec("attention", (AttentionOp,), flops=attention_flops, coupling=attention_coupling,
           removal=remove_from_attention, example=lambda: (_Attention(True), (torch.randn(1, 5, 8),))),
)
