"""Recurrent cells (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``): their hidden units are
channels, across every step of the model's own loop.

Each call *produces* the cell's units (the last axis of ``h'``, and of ``c'`` for an LSTM
cell) and reads the state it is given back through ``weight_hh``: the state's last axis holds
the same units, so in an unrolled loop (``h = cell(x[:, t], h)``) every step's units are one
channel group, removed with all their gates (the rows of the LSTM's i, f, g, o or the GRU's
r, z, n). The input's features are *consumed* (columns of ``weight_ih``). As for the recurrent
layers (:mod:`.recurrent`), the call is also a consumer of its own units (a site of kind
``"inner"``): in the gated model the mask scales ``weight_hh``'s columns (and ``weight_ih``'s by
the input features' mask), so a closed unit still computes a value that no kept unit reads.

A state left out (``cell(x)``: zeros of the cell's own width) follows the removal; a state given
as an untracked tensor (``torch.zeros(batch, 16)``, its width a literal the removal cannot
rewrite) bars the units.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from dagprune.ops.slicing import kept_count, replace_tensor, slice_tensor
from dagprune.ops.spec import ChannelWeight, OpSpec, opaque_coupling
from dagprune.ops.specs.calls import layer_call, with_layer
from dagprune.ops.specs.recurrent import couple_units, recurrent_flops

__all__ = ["SPECS"]

_CELLS = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)


def _gates(cell: nn.RNNCellBase) -> int:
    return cell.weight_ih.shape[0] // cell.hidden_size


def cell_coupling(ctx, vertex, module, layouts, values, output):
    """Units produced (and read back from the state), input features consumed; see the module
    docstring. The batch axis carries no channels."""
    call = layer_call(module, len(layouts))
    x_index = call.input_index("input") if call is not None else None
    x = values[x_index] if x_index is not None else None
    if not isinstance(x, torch.Tensor):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    cell = call.layer
    in_atoms, units = couple_units(ctx, vertex, call, layouts, values, x_index, "batch axis read by a recurrent cell")
    rows = x.numel() // cell.input_size
    ctx.count_flops(vertex, 2 * rows * cell.weight_ih.numel(),
                    [units] + ([in_atoms] if in_atoms is not None else []))
    ctx.count_flops(vertex, 2 * rows * cell.weight_hh.numel(), [units, units])
    if isinstance(output, tuple):  # LSTMCell: (h', c')
        return tuple({item.ndim - 1: units} for item in output)
    return {output.ndim - 1: units}


def mask_cell(module, inputs, mask, axis):
    """The cell with its input features and units masked where it reads them (the site's
    positions: ``input_size`` features, then ``hidden_size`` units)."""
    call = layer_call(module, len(inputs))
    cell = call.layer
    input_mask, unit_mask = mask[:cell.input_size], mask[cell.input_size:]
    return call.run(list(inputs), {"weight_ih": cell.weight_ih * input_mask.to(cell.weight_ih.dtype),
                                   "weight_hh": cell.weight_hh * unit_mask.to(cell.weight_hh.dtype)})


def sliced_cell(cell: nn.RNNCellBase, input_mask: np.ndarray | None, unit_mask: np.ndarray | None):
    """A copy of ``cell`` keeping the input features and units the masks keep: every gate's
    rows of a kept unit, the kept columns."""
    cell = copy.deepcopy(cell)
    units = np.ones(cell.hidden_size, dtype=bool) if unit_mask is None else unit_mask
    rows = np.tile(units, _gates(cell))
    for name, tensor in list(cell.named_parameters(recurse=False)):
        sliced = slice_tensor(tensor, 0, rows)
        if name == "weight_ih":
            sliced = slice_tensor(sliced, 1, input_mask)
        elif name == "weight_hh":
            sliced = slice_tensor(sliced, 1, units)
        replace_tensor(cell, name, sliced)
    cell.input_size = kept_count(input_mask, cell.input_size)
    cell.hidden_size = int(units.sum())
    return cell


def remove_from_cell(module, input_masks, output_mask, shapes):
    call = layer_call(module, len(input_masks))
    x_index = call.input_index("input")
    feature_axis = len(shapes[x_index]) - 1
    state_mask = output_mask[0] if isinstance(output_mask, (tuple, list)) else output_mask
    unit_mask = (state_mask or {}).get(feature_axis)
    return with_layer(module, sliced_cell(call.layer, input_masks[x_index].get(feature_axis), unit_mask))


def cell_unit_filters(module, vertex) -> ChannelWeight:
    """Per unit: its rows of every gate's input and recurrent weights."""
    cell = layer_call(module, len(vertex.predecessors)).layer
    rows = torch.cat([cell.weight_ih, cell.weight_hh], 1)
    return ChannelWeight(rows.reshape(_gates(cell), cell.hidden_size, -1).transpose(0, 1).flatten(1), 0)


class _Unrolled(nn.Module):
    """A loop over time: features -> the cell, its state carried from step to step -> a head."""

    def __init__(self, cell_type: type):
        super().__init__()
        self.embed, self.cell, self.head = nn.Linear(3, 6), cell_type(6, 5), nn.Linear(5, 2)
        self.has_cell_state = cell_type is nn.LSTMCell

    def forward(self, x):
        state = None
        for step in range(x.shape[1]):
            state = self.cell(self.embed(x[:, step]), state)
        return self.head(state[0] if self.has_cell_state else state)


def _example(cell_type: type):
    return lambda: (_Unrolled(cell_type), (torch.randn(2, 3, 3),))


SPECS = tuple(
    OpSpec(name, (cell_type,), flops=recurrent_flops, coupling=cell_coupling, removal=remove_from_cell,
           masking=mask_cell, importance=cell_unit_filters, accepts_calls=True, example=_example(cell_type))
    for name, cell_type in (("lstm_cell", nn.LSTMCell), ("gru_cell", nn.GRUCell), ("rnn_cell", nn.RNNCell)))
