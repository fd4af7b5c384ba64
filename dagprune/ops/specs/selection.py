"""Selection by an index tensor along one axis: ``index_select``, ``gather``, ``take_along_dim``.

``torch.index_select(x, dim, index)`` keeps the positions ``index`` of axis ``dim``; every other
axis passes unchanged, so its channels pass. ``torch.gather(x, dim, index)`` (and
``take_along_dim(x, index, dim)``) reads ``x`` at ``index`` along ``dim`` and at the same
position on every other axis: the output has the index's shape, and an axis other than ``dim``
carries ``x``'s channels only where the index carries the same channels there (token pruning's
``x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))``: the index is expanded to the
channel count, and removal shrinks both alike). Channels of the selected axis itself are
barriers (the index counts their positions), as are an index's other channels. Nothing is held
per channel: removal keeps the op.
"""

from __future__ import annotations

import torch
from torch import nn

from dagprune.ops.channel_map import argument_input, barrier_all, tensor_layout
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.slicing import unchanged_removal
from dagprune.ops.spec import OpSpec

__all__ = ["SPECS"]

_INDEX_SELECT = ("torch.index_select", "Tensor.index_select")
_GATHER = ("torch.gather", "Tensor.gather", "torch.take_along_dim", "Tensor.take_along_dim")


def _operands(module) -> tuple[int | None, int | None, object]:
    """The input's and the index's positions among the op's inputs, and ``dim``."""
    if module.short_name == "take_along_dim":
        return (argument_input(module, 0, "input"), argument_input(module, 1, "indices"),
                module.argument(2, "dim"))
    return argument_input(module, 0, "input"), argument_input(module, 2, "index"), module.argument(1, "dim")


def selection_coupling(ctx, vertex, module, layouts, values, output):
    """See the module docstring."""
    x_index, index_index, dim = _operands(module)
    if x_index is None or index_index is None or not isinstance(dim, int) or isinstance(dim, bool) \
            or not isinstance(output, torch.Tensor):
        return barrier_all(ctx, layouts, f"{module.short_name} with a run-time or missing axis")
    x, index = values[x_index], values[index_index]
    x_layout, index_layout = tensor_layout(layouts[x_index]), tensor_layout(layouts[index_index])
    dim %= max(x.ndim, 1)
    if dim in x_layout:
        ctx.barrier(x_layout[dim], f"{module.short_name} along a channel axis")
    if module.short_name == "index_select":
        ctx.barrier_layout(index_layout, "the index of an index_select")
        return {axis: atoms for axis, atoms in x_layout.items() if axis != dim} or None
    return _gathered_layout(ctx, module, x, index, x_layout, index_layout, dim)


def _gathered_layout(ctx, module, x, index, x_layout: dict, index_layout: dict, dim: int):
    result = {}
    for axis in set(x_layout) | set(index_layout):
        mine, theirs = x_layout.get(axis), index_layout.get(axis)
        if axis != dim and mine is not None and theirs is not None and len(mine) == len(theirs) \
                and x.shape[axis] == index.shape[axis]:
            ctx.unify(mine, theirs)
            result[axis] = mine
            continue
        for atoms in (mine, theirs):  # an axis the index does not shrink with x (or the selected one)
            if atoms is not None and axis != dim:
                ctx.barrier(atoms, f"{module.short_name}: channels the index does not carry alike")
    if dim in index_layout:
        ctx.barrier(index_layout[dim], f"the index of a {module.short_name}")
    return result or None


class _TokenSelection(nn.Module):
    """Token pruning's gather (EViT-style: keep the top tokens by a score) and an index_select of
    rows."""

    def __init__(self):
        super().__init__()
        self.embed, self.score, self.head = nn.Linear(4, 8), nn.Linear(8, 1), nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        keep = self.score(h).squeeze(-1).topk(3, dim=1).indices
        kept = torch.gather(h, 1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        first = torch.index_select(h, 1, torch.tensor([0, 2]))
        return self.head(torch.cat([kept, first], dim=1))


def _example():
    return _TokenSelection(), (torch.randn(2, 5, 4),)


SPECS = (
    OpSpec("index_selection", (*_INDEX_SELECT, *_GATHER), flops=no_flops, coupling=selection_coupling,
           removal=unchanged_removal, example=_example),
)
