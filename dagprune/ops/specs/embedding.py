"""Embedding tables (``nn.Embedding``, ``nn.EmbeddingBag``): rows looked up by integer IDs.

The table's columns are the output's channels (the last axis): an embedding *produces*
channels, like a linear layer without an input, so a residual stream that starts at a token
embedding is one channel group. A table with ``max_norm`` renormalises whole rows on lookup
(mixing its columns): its channels are a group that is never pruned, with that reason.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dagprune.ops.flop_counting import no_flops
from dagprune.ops.slicing import kept_count, replace_tensor, slice_tensor
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


class _TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.mlp, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids):
        tokens = self.embed(ids)
        return self.head(tokens + self.mlp(tokens))


SPECS = (
    OpSpec("embedding", (nn.Embedding, nn.EmbeddingBag), flops=no_flops, coupling=embedding_coupling,
           removal=remove_from_embedding, importance=embedding_columns,
           example=lambda: (_TokenModel(), (torch.randint(0, 20, (2, 5)),))),
)
