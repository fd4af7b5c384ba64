"""Multi-head attention layers: ``nn.MultiheadAttention`` and :class:`PrunedMultiheadAttention`.

The channels of such a layer:

* the query's, key's and value's features (their last axis) are consumed: columns of the q,
  k and v projections;
* the output's features are produced: rows of ``out_proj``;
* head dims are created and read back inside the layer (q and k dims meet in the scores, v dims
  in ``out_proj``), channels no tensor shows. With ``head_pruning="dims"`` the same dims are
  removed from every head (q/k dims and v dims are two groups); with ``"heads"`` whole heads
  go, their q, k and v dims together.

The layer consumes all of them at one site of kind ``"inner"``, whose positions are the query
features, key features, value features, q/k dims and v dims. In the gated model the masking
facet scales the projections (rows of kept q dims, columns of kept features, columns of
``out_proj`` for kept v dims) and runs :func:`multihead_attention`: a closed q dim adds nothing
to the scores, a closed v dim nothing to the output. Removal replaces the layer by a
:class:`PrunedMultiheadAttention` holding the kept rows and columns and the original scale, so
both compute the same.

Whole heads are removed only when nothing reads per-head data the layer cannot slice: with
attention weights averaged over heads (``need_weights=True``, ``average_attn_weights=True``,
the defaults) or a per-head ``attn_mask`` (3-d), the layer's head dims are pruned instead. Not
followed (a barrier): ``add_bias_kv``, ``add_zero_attn``, unbatched inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from dagprune.ops.channel_map import tensor_layout
from dagprune.ops.flop_counting import measured_flops
from dagprune.ops.multihead_attention import (AttentionWeights, PrunedMultiheadAttention,
                                              attention_weights_of, multihead_attention,
                                              original_scale)
from dagprune.ops.slicing import replace_tensor, slice_tensor
from dagprune.ops.spec import INNER_AXIS, ChannelWeight, OpSpec, opaque_coupling
from dagprune.ops.specs.calls import LayerCall, layer_call, with_layer

__all__ = ["SPECS", "attention_layer_flops"]

_TENSOR_ARGUMENTS = ("query", "key", "value")


@dataclasses.dataclass(frozen=True)
class _Widths:
    """A layer's feature counts and head shape."""

    query: int
    key: int
    value: int
    out: int
    heads: int
    head_dim: int
    value_head_dim: int

    @property
    def site_sizes(self) -> list[int]:
        """The parts of the layer's consumer site: features of q, k, v; q/k dims; v dims."""
        return [self.query, self.key, self.value, self.heads * self.head_dim,
                self.heads * self.value_head_dim]


def _widths(layer: nn.Module) -> _Widths:
    weights, heads = attention_weights_of(layer), layer.num_heads
    return _Widths(weights.query.shape[1], weights.key.shape[1], weights.value.shape[1],
                   weights.out.shape[0], heads, weights.query.shape[0] // heads,
                   weights.value.shape[0] // heads)


def _scale(layer: nn.Module) -> float:
    return layer.scale if isinstance(layer, PrunedMultiheadAttention) else original_scale(layer)


def _followed_call(module: nn.Module, values: list) -> LayerCall | None:
    """The layer call, when its channels can be followed: batched q, k, v tensors, no extra
    key/value biases, no zero attention."""
    call = layer_call(module, len(values))
    if call is None or getattr(call.layer, "bias_k", None) is not None or getattr(
            call.layer, "add_zero_attn", False):
        return None
    indices = [call.input_index(name) for name in _TENSOR_ARGUMENTS]
    if None in indices or not all(isinstance(values[i], torch.Tensor) and values[i].ndim == 3
                                  for i in indices):
        return None
    return call


# ------------------------------------------------------------------------------- flops
def _flops_parts(widths: _Widths, query: torch.Tensor, key: torch.Tensor, batch_first: bool) -> list[int]:
    """FLOPs of the q, k, v projections, the scores, the weighted values and ``out_proj``."""
    queries, keys = query.numel() // query.shape[-1], key.numel() // key.shape[-1]
    pairs = queries * key.shape[1 if batch_first else 0]  # batch x L x S
    qk_width, v_width = widths.heads * widths.head_dim, widths.heads * widths.value_head_dim
    return [2 * queries * widths.query * qk_width, 2 * keys * widths.key * qk_width,
            2 * keys * widths.value * v_width, 2 * pairs * qk_width, 2 * pairs * v_width,
            2 * queries * v_width * widths.out]


def attention_layer_flops(module: nn.Module, inputs, output) -> int:
    """The projections and the two attention products (measured for layers not followed)."""
    call = _followed_call(module, list(inputs))
    if call is None:
        return measured_flops(module, inputs, output)
    query, key = (call.value(name, list(inputs)) for name in ("query", "key"))
    return sum(_flops_parts(_widths(call.layer), query, key, call.layer.batch_first))


# ------------------------------------------------------------------------------- coupling
def _consumed_features(ctx, call: LayerCall, layouts: list) -> list:
    """The q, k and v features (or None where untracked); masks' channels are barriers."""
    indices = [call.input_index(name) for name in _TENSOR_ARGUMENTS]
    for index, layout in enumerate(layouts):
        if index not in indices:
            ctx.barrier_layout(layout, "attention mask")
    features = []
    for index in indices:
        layout = dict(tensor_layout(layouts[index]))
        features.append(layout.pop(2, None))
        ctx.barrier_layout(layout, "token or batch axis read by attention")
    return features


def _prunes_heads(ctx, call: LayerCall, values: list, widths: _Widths) -> bool:
    """Whether whole heads are removed (see the module docstring)."""
    averaged = call.value("need_weights", values, True) and call.value("average_attn_weights", values, True)
    attn_mask = call.value("attn_mask", values)
    per_head_mask = isinstance(attn_mask, torch.Tensor) and attn_mask.ndim == 3
    return ctx.head_pruning == "heads" and widths.heads > 1 and not averaged and not per_head_mask


def _head_dims(ctx, by_heads: bool, widths: _Widths) -> tuple[np.ndarray, np.ndarray]:
    """Atoms of the q/k dims and v dims, (heads, dims) each, tied per head or per dim."""
    qk = ctx.fresh(widths.heads * widths.head_dim).reshape(widths.heads, -1)
    v = ctx.fresh(widths.heads * widths.value_head_dim).reshape(widths.heads, -1)
    if by_heads:
        for head in range(widths.heads):
            ctx.tie(np.concatenate([qk[head], v[head]]))
    else:
        for dims in (qk, v):
            for dim in range(dims.shape[1]):
                ctx.tie(dims[:, dim])
    ctx.mark_producer(qk.ravel(), INNER_AXIS)
    ctx.mark_producer(v.ravel(), INNER_AXIS)
    return qk, v


def attention_coupling(ctx, vertex, module, layouts, values, output):
    """Features consumed, output features produced, head dims created and read back inside."""
    call = _followed_call(module, values)
    if call is None:
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    widths = _widths(call.layer)
    features = _consumed_features(ctx, call, layouts)
    by_heads = _prunes_heads(ctx, call, values, widths)
    qk, v = _head_dims(ctx, by_heads, widths)
    out = ctx.produce(widths.out, axis=2)
    read = [atoms if atoms is not None else ctx.fresh(size) for atoms, size in zip(features, widths.site_sizes)]
    ctx.consume(vertex, call.input_index("query"), 2, np.concatenate(read + [qk.ravel(), v.ravel()]),
                kind="inner")
    query, key = (call.value(name, values) for name in ("query", "key"))
    parts = _flops_parts(widths, query, key, call.layer.batch_first)
    factors = ([features[0], qk], [features[1], qk], [features[2], v], [qk], [v], [v, out])
    for base, part_factors in zip(parts, factors):
        ctx.count_flops(vertex, base, [np.ravel(f) for f in part_factors if f is not None])
    per_head = isinstance(output[1], torch.Tensor) and output[1].ndim == 4
    return {2: out}, ({1: qk[:, 0]} if by_heads and per_head else None)


# ------------------------------------------------------------------------------- masking
def _run(call: LayerCall, values: list, weights: AttentionWeights):
    """The layer's computation on the vertex inputs ``values`` with ``weights``."""
    layer = call.layer
    arguments = {name: call.value(name, values) for name in call.arguments}
    query, key, value = (arguments.pop(name) for name in _TENSOR_ARGUMENTS)
    return multihead_attention(query, key, value, weights, layer.num_heads, _scale(layer),
                               batch_first=layer.batch_first,
                               dropout=layer.dropout if layer.training else 0.0, **arguments)


def mask_attention(module, inputs, mask, axis):
    """The layer with its features and head dims masked where it reads them."""
    call = layer_call(module, len(inputs))
    weights = attention_weights_of(call.layer)
    query, key, value, qk, v = mask.split(_widths(call.layer).site_sizes)
    masked = AttentionWeights(
        weights.query * qk[:, None] * query, weights.key * key, weights.value * value,
        weights.out * v, None if weights.query_bias is None else weights.query_bias * qk,
        weights.key_bias, weights.value_bias, weights.out_bias)
    return _run(call, list(inputs), masked)


# ------------------------------------------------------------------------------- removal
def _kept_heads(qk_keep: np.ndarray, v_keep: np.ndarray, heads: int) -> tuple[np.ndarray, int, int]:
    """Which heads keep a dim, and how many q/k and v dims each kept head keeps."""
    qk_keep, v_keep = qk_keep.reshape(heads, -1), v_keep.reshape(heads, -1)
    kept = qk_keep.any(1) | v_keep.any(1)
    return kept, int(qk_keep[kept].sum(1).max()), int(v_keep[kept].sum(1).max())


def _slim_projection(linear: nn.Linear, weight, bias, rows, columns) -> None:
    replace_tensor(linear, "weight", slice_tensor(slice_tensor(weight, 0, rows), 1, columns))
    if bias is not None:
        replace_tensor(linear, "bias", slice_tensor(bias, 0, rows))


def sliced_attention(layer: nn.Module, keep: np.ndarray, out_keep: np.ndarray | None) -> PrunedMultiheadAttention:
    """A :class:`PrunedMultiheadAttention` computing ``layer`` with the kept site positions
    ``keep`` (see :class:`_Widths`) and the kept output features ``out_keep``."""
    widths, weights = _widths(layer), attention_weights_of(layer)
    query, key, value, qk, v = np.split(keep, np.cumsum(widths.site_sizes)[:-1])
    out = np.ones(widths.out, dtype=bool) if out_keep is None else out_keep
    kept_heads, head_dim, value_head_dim = _kept_heads(qk, v, widths.heads)
    slim = PrunedMultiheadAttention(
        int(query.sum()), int(key.sum()), int(value.sum()), int(out.sum()), int(kept_heads.sum()),
        head_dim, value_head_dim, _scale(layer), bias=weights.out_bias is not None,
        batch_first=layer.batch_first, dropout=layer.dropout)
    _slim_projection(slim.q_proj, weights.query, weights.query_bias, qk, query)
    _slim_projection(slim.k_proj, weights.key, weights.key_bias, qk, key)
    _slim_projection(slim.v_proj, weights.value, weights.value_bias, v, value)
    _slim_projection(slim.out_proj, weights.out, weights.out_bias, out, v)
    return slim.train(layer.training)


def remove_from_attention(module, input_masks, output_mask, shapes, inner_mask=None):
    call = layer_call(module, len(input_masks))
    keep = np.ones(sum(_widths(call.layer).site_sizes), dtype=bool) if inner_mask is None else inner_mask
    return with_layer(module, sliced_attention(call.layer, keep, output_mask[0].get(2)))


def output_filters(module, vertex) -> ChannelWeight:
    return ChannelWeight(layer_call(module, len(vertex.predecessors)).layer.out_proj.weight, 0)


# ------------------------------------------------------------------------------- example
class _CrossAttention(nn.Module):
    """Tokens attend to a memory of other widths (``kdim``, ``vdim``); a linear head reads them."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(5, 8), nn.Linear(5, 6), nn.Linear(5, 4)
        self.attention = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attention(self.query(x), self.key(x), self.value(x))[0])


SPECS = (
    OpSpec("multihead_attention", (nn.MultiheadAttention, PrunedMultiheadAttention),
           flops=attention_layer_flops, coupling=attention_coupling, removal=remove_from_attention,
           masking=mask_attention, importance=output_filters, inner_masks=True, accepts_calls=True,
           example=lambda: (_CrossAttention(), (torch.randn(2, 5, 5),))),
)
