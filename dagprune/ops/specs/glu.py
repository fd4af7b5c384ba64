"""Gated linear units: ``nn.GLU`` and ``F.glu``.

``glu(x, dim)`` splits ``x`` into halves ``a, b`` along ``dim`` and returns ``a * sigmoid(b)``:
output channel ``i`` reads input channels ``i`` and ``i + n`` (``n`` the half size). The two are
one class, kept or removed together, and the output's channels are those classes; channels on
other axes pass through, as for any elementwise op. Nothing is held per channel, so removal
keeps the op as it is; like activations, it counts no FLOPs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dagprune.ops.channel_map import argument_input, barrier_all, constant_argument, operand_layout
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.slicing import unchanged_removal
from dagprune.ops.spec import OpSpec

__all__ = ["SPECS"]


def glu_coupling(ctx, vertex, module, layouts, values, output):
    """See the module docstring."""
    if isinstance(module, nn.GLU):
        dim, x_index = module.dim, 0
    else:
        dim, x_index = constant_argument(module, 1, "dim", -1), argument_input(module, 0, "input")
    if x_index is None or not isinstance(dim, int) or isinstance(dim, bool):
        return barrier_all(ctx, layouts, "a split axis that is not a constant integer")
    layout = dict(operand_layout(ctx, vertex, layouts, x_index))
    axis = dim % values[x_index].ndim
    atoms = layout.get(axis)
    if atoms is not None:
        halves = np.asarray(atoms).reshape(2, -1)
        ctx.unify(halves[0], halves[1])
        layout[axis] = halves[0].copy()
    return layout or None


class _FunctionalGlu(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 16), nn.Linear(8, 3)

    def forward(self, x):
        return self.down(torch.nn.functional.glu(self.up(x), dim=-1))


def _example():
    model = nn.Sequential(nn.Conv1d(4, 16, 1), nn.GLU(dim=1), nn.Conv1d(8, 4, 3))
    return model, (torch.randn(2, 4, 7),)


def _functional_example():
    return _FunctionalGlu(), (torch.randn(2, 5, 4),)


SPECS = (
    OpSpec("glu", (nn.GLU,), flops=no_flops, coupling=glu_coupling, removal=unchanged_removal, example=_example),
    OpSpec("functional_glu", ("torch.nn.functional.glu", "torch.glu"), flops=no_flops, coupling=glu_coupling,
           removal=unchanged_removal, example=_functional_example),
)
