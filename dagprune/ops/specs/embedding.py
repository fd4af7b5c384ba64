"""Embedding tables (``nn.Embedding``, ``nn.EmbeddingBag``): rows looked up by integer IDs.

The table's columns are the output's channels (the last axis): an embedding *produces*
channels, like a linear layer without an input, so a residual stream that starts at a token
embedding is one channel group. A table with ``max_norm`` renormalises whole rows on lookup
(mixing its columns): its channels are a group that is never pruned, with that reason.

``F.embedding(ids, weight)`` with a weight read in the graph (a parameter of a subclass with
its own forward, as OPT's learned positions, or a tied table) maps the same way: the weight's
columns are the output's channels (the parameter's spec slices it); its rows, indexed by the
IDs, are never pruned.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dagprune.ops.channel_map import argument_input, argument_value, tensor_layout
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.slicing import kept_count, replace_tensor, slice_tensor, unchanged_removal
from dagprune.ops.spec import ChannelWeight, OpSpec, opaque_coupling

__all__ = ["SPECS"]


def embedding_coupling(ctx, vertex, module, layouts, values, output):
    """New channels on the output's last axis; the IDs (and bag offsets, weights) carry none."""
    if not isinstance(output, torch.Tensor):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    ctx.barrier_layout(layouts, "channels used as embedding IDs")
    last = output.ndim - 1
    channels = ctx.produce(module.embedding_dim, axis=last)
    if module.max_norm is not None:  # a group of its own, not prunable, with its reason
        ctx.barrier(channels, "embedding with max_norm (each row renormalised over all its columns)")
    return {last: channels}


def remove_from_embedding(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    mask = output_mask.get(len(shapes[-1]) - 1)
    replace_tensor(module, "weight", slice_tensor(module.weight, 1, mask))
    module.embedding_dim = kept_count(mask, module.embedding_dim)
    return module


def embedding_columns(module, vertex) -> ChannelWeight:
    return ChannelWeight(module.weight, 1)


def functional_embedding_coupling(ctx, vertex, module, layouts, values, output):
    """``F.embedding(ids, weight)``: the weight's columns are the output's last axis."""
    ids, weight = argument_input(module, 0, "input"), argument_input(module, 1, "weight")
    if ids is None or weight is None or not isinstance(output, torch.Tensor):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    ctx.barrier_layout(layouts[ids], "channels used as embedding IDs")
    w_layout = tensor_layout(layouts[weight])
    if w_layout.get(0) is not None:
        ctx.barrier(w_layout[0], "embedding rows (indexed by the IDs)")
    columns = w_layout.get(1)
    if columns is None:
        return None
    last = output.ndim - 1
    ctx.mark_producer(columns, last)
    if argument_value(module, values, 3, "max_norm", None) is not None:
        ctx.barrier(columns, "embedding with max_norm (each row renormalised over all its columns)")
    return {last: columns}


def functional_embedding_columns(module, vertex) -> ChannelWeight | None:
    """The table read by the vertex feeding the weight argument."""
    weight = argument_input(module, 1, "weight")
    value = getattr(vertex.predecessors[weight].module, "value", None) if weight is not None else None
    return ChannelWeight(value, 1) if isinstance(value, torch.Tensor) else None


class _TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.mlp, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids):
        tokens = self.embed(ids)
        return self.head(tokens + self.mlp(tokens))


class _OffsetPositions(nn.Embedding):
    """Learned positions looked up at an offset, by the subclass's own forward (as OPT's)."""

    def forward(self, ids):
        return F.embedding(ids + 2, self.weight)


class _PositionedTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.positions, self.mlp, self.head = (nn.Embedding(20, 8), _OffsetPositions(9, 8),
                                                           nn.Linear(8, 8), nn.Linear(8, 3))

    def forward(self, ids):
        tokens = self.embed(ids) + self.positions(torch.arange(ids.shape[1]))
        return self.head(tokens + self.mlp(tokens))


SPECS = (
    OpSpec("embedding", (nn.Embedding, nn.EmbeddingBag), flops=no_flops, coupling=embedding_coupling,
           removal=remove_from_embedding, importance=embedding_columns,
           example=lambda: (_TokenModel(), (torch.randint(0, 20, (2, 5)),))),
    # the table is a ParameterOp input, sliced by its own spec
    OpSpec("functional_embedding", ("torch.nn.functional.embedding",), flops=no_flops,
           coupling=functional_embedding_coupling, removal=unchanged_removal,
           importance=functional_embedding_columns,
           example=lambda: (_PositionedTokens(), (torch.randint(0, 20, (2, 5)),))),
)
