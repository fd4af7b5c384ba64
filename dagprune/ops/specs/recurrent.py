"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): their hidden units are channels.

The layer *produces* its hidden units. It has one ``hidden_size`` for all its layers and
directions, so unit ``k`` of every layer and direction is one channel: the output's feature
axis (the directions side by side, ``[forward units, backward units]``) and the last axis of
``h_n`` (and ``c_n``) carry the same channels, and a unit is removed with all its gates (the
rows of the LSTM's i, f, g, o or the GRU's r, z, n). The input's features are *consumed*
(columns of ``weight_ih_l0``); an initial state passed in carries the units on its last axis.

Through its recurrence the layer reads its own units back (``weight_hh`` and the next layer's
``weight_ih``): it is also a consumer of them (a site of kind ``"inner"``). In the gated model
the mask scales those weights' columns (and ``weight_ih_l0``'s columns by the input features'
mask): a closed unit still computes a value, but no kept unit reads it, and every other reader
of the output masks it like any produced channel. With hard masks the gated layer therefore
equals the layer with the closed units and inputs cut out.

LSTMs with projections (``proj_size``) and packed sequences are not followed: their FLOPs are
counted, their channels are barriers. The cells (``nn.LSTMCell``, ...): :mod:`.recurrent_cells`.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from dagprune.ops.channel_map import tensor_layout
from dagprune.ops.slicing import kept_count, replace_tensor, slice_tensor
from dagprune.ops.spec import ChannelWeight, OpSpec, opaque_coupling
from dagprune.ops.specs.calls import layer_call, with_layer
from dagprune.ops.templates import fill_template

__all__ = ["SPECS", "recurrent_flops", "couple_units"]

_WEIGHT_NAME = re.compile(r"weight_(ih|hh)_l(\d+)(_reverse)?$")


def recurrent_flops(module: nn.Module, inputs, output) -> int:
    """Every weight matrix (input, hidden, projection; all layers and directions) at every step
    (``module``: the layer, or a call of it).

    Counted by formula: on CPU torch runs LSTMs with a oneDNN kernel FlopCounterMode cannot see.
    """
    call = layer_call(module, len(inputs))
    layer, sequence = (module, inputs[0]) if call is None else (call.layer, call.value("input", list(inputs)))
    sequence = sequence.data if isinstance(sequence, PackedSequence) else sequence
    steps = sequence.numel() // layer.input_size  # batch x time
    matrices = sum(weight.numel() for name, weight in layer.named_parameters()
                   if name.startswith("weight_"))
    return 2 * steps * matrices


def _directions(rnn: nn.RNNBase) -> int:
    return 2 if rnn.bidirectional else 1


def _reads_input_features(name: str) -> bool:
    """Whether parameter ``name`` is a first-layer input weight (its columns are the input's
    features; every other weight's columns are hidden units)."""
    match = _WEIGHT_NAME.match(name)
    return match is not None and match.group(1) == "ih" and match.group(2) == "0"


# ------------------------------------------------------------------------------- coupling
def _tensors_and_layouts(value, layout) -> list[tuple[torch.Tensor, dict]]:
    """The tensors of a (nested) tuple value, each with its layout."""
    if isinstance(value, (tuple, list)):
        layouts = layout if isinstance(layout, (tuple, list)) and len(layout) == len(value) else [None] * len(value)
        return [pair for item, item_layout in zip(value, layouts)
                for pair in _tensors_and_layouts(item, item_layout)]
    return [(value, tensor_layout(layout))] if isinstance(value, torch.Tensor) else []


def couple_initial_state(ctx, call, layouts, values, units) -> None:
    """``h_0`` (and ``c_0``) hold the units on their last axis: the same channels as the
    output's. Untracked there, the units cannot be removed (the state would keep them)."""
    template = call.arguments.get("hx")
    states = _tensors_and_layouts(fill_template(template, values), fill_template(template, layouts))
    for state, layout in states:
        layout = dict(layout)
        atoms = layout.pop(state.ndim - 1, None)
        ctx.barrier_layout(layout, "layer or batch axis of a recurrent layer's initial state")
        if atoms is None:
            ctx.barrier(units, "initial state of a recurrent layer with untracked units")
        else:
            ctx.unify(atoms, units)


def couple_units(ctx, vertex, call, layouts, values, x_index: int, other_axes: str):
    """The layer's (or cell's) units produced on the input's last axis and read back (an
    ``"inner"`` site after the input features), its initial state's units unified with them,
    the input's other axes barred (``other_axes`` says why). Returns ``(input atoms or None,
    units)``."""
    layer, feature_axis = call.layer, values[x_index].ndim - 1
    x_layout = dict(tensor_layout(layouts[x_index]))
    in_atoms = x_layout.pop(feature_axis, None)
    ctx.barrier_layout(x_layout, other_axes)
    units = ctx.produce(layer.hidden_size, axis=feature_axis)
    couple_initial_state(ctx, call, layouts, values, units)
    read_atoms = in_atoms if in_atoms is not None else ctx.fresh(layer.input_size)
    ctx.consume(vertex, x_index, feature_axis, np.concatenate([read_atoms, units]), kind="inner")
    return in_atoms, units


def _count_flops(ctx, vertex, rnn, sequence, in_atoms, units) -> None:
    """FLOPs of the first layer's input weights scale with the kept inputs and units; those
    of every other weight (recurrent weights, deeper layers) with the kept units, twice."""
    steps = sequence.numel() // rnn.input_size
    first, other = 0, 0
    for name, weight in rnn.named_parameters(recurse=False):
        if name.startswith("weight_"):
            if _reads_input_features(name):
                first += weight.numel()
            else:
                other += weight.numel()
    ctx.count_flops(vertex, 2 * steps * first, [units] + ([in_atoms] if in_atoms is not None else []))
    ctx.count_flops(vertex, 2 * steps * other, [units, units])


def _output_layout(rnn, output, units, feature_axis: int):
    """``(output, h_n)`` or ``(output, (h_n, c_n))`` layouts: the units on the last axes."""
    sequence_layout = {feature_axis: np.tile(units, _directions(rnn))}
    state = output[1]
    if isinstance(state, tuple):
        return sequence_layout, tuple({item.ndim - 1: units} for item in state)
    return sequence_layout, {state.ndim - 1: units}


def recurrent_coupling(ctx, vertex, module, layouts, values, output):
    """Hidden units produced (and read back), input features consumed; see the module
    docstring. The input's time and batch axes carry no channels."""
    call = layer_call(module, len(layouts))
    x_index = call.input_index("input") if call is not None else None
    sequence = values[x_index] if x_index is not None else None
    if not isinstance(sequence, torch.Tensor) or getattr(call.layer, "proj_size", 0):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    rnn, feature_axis = call.layer, sequence.ndim - 1
    in_atoms, units = couple_units(ctx, vertex, call, layouts, values, x_index,
                                   "time or batch axis read by a recurrent layer")
    _count_flops(ctx, vertex, rnn, sequence, in_atoms, units)
    return _output_layout(rnn, output, units, feature_axis)


# ------------------------------------------------------------------------------- masking
def masked_recurrent_weights(rnn: nn.RNNBase, input_mask: torch.Tensor,
                             unit_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layer's weight matrices with their columns scaled: by ``input_mask`` for the first
    layer's input weights, by ``unit_mask`` (per direction) for every other one."""
    hidden_columns = unit_mask.repeat(_directions(rnn))
    masked = {}
    for name, weight in rnn.named_parameters(recurse=False):
        if _WEIGHT_NAME.match(name):
            columns = input_mask if _reads_input_features(name) else (
                unit_mask if name.startswith("weight_hh") else hidden_columns)
            masked[name] = weight * columns.to(weight.dtype)
    return masked


def mask_recurrent(module, inputs, mask, axis):
    """The layer with its input features and hidden units masked where it reads them (the
    site's positions: ``input_size`` features, then ``hidden_size`` units)."""
    call = layer_call(module, len(inputs))
    rnn = call.layer
    input_mask, unit_mask = mask[:rnn.input_size], mask[rnn.input_size:]
    try:
        return call.run(list(inputs), masked_recurrent_weights(rnn, input_mask, unit_mask))
    finally:  # functional_call leaves the masked weights in the layer's list of flat weights,
        rnn._init_flat_weights()  # which the DAG sharing the layer would then fail to save


# ------------------------------------------------------------------------------- removal
def sliced_recurrent(rnn: nn.RNNBase, input_mask: np.ndarray | None,
                     unit_mask: np.ndarray | None) -> nn.RNNBase:
    """A copy of ``rnn`` keeping the input features and hidden units the masks keep: every
    gate's rows of a kept unit, the kept columns."""
    rnn = copy.deepcopy(rnn)
    units = np.ones(rnn.hidden_size, dtype=bool) if unit_mask is None else unit_mask
    for name, tensor in list(rnn.named_parameters(recurse=False)):
        sliced = slice_tensor(tensor, 0, np.tile(units, tensor.shape[0] // rnn.hidden_size))
        if _WEIGHT_NAME.match(name):
            columns = input_mask if _reads_input_features(name) else np.tile(
                units, tensor.shape[1] // rnn.hidden_size)
            sliced = slice_tensor(sliced, 1, columns)
        replace_tensor(rnn, name, sliced)
    rnn.input_size = kept_count(input_mask, rnn.input_size)
    rnn.hidden_size = int(units.sum())
    rnn._init_flat_weights()  # the fused kernels read the weights from this list
    return rnn


def remove_from_recurrent(module, input_masks, output_mask, shapes):
    call = layer_call(module, len(input_masks))
    x_index = call.input_index("input")
    feature_axis = len(shapes[x_index]) - 1
    sequence_mask = output_mask[0].get(feature_axis)
    unit_mask = None if sequence_mask is None else sequence_mask[:call.layer.hidden_size]
    slim = sliced_recurrent(call.layer, input_masks[x_index].get(feature_axis), unit_mask)
    return with_layer(module, slim)


# ------------------------------------------------------------------------------- importance
def unit_filters(module, vertex) -> ChannelWeight:
    """Per output position (direction, unit): the first layer's input and recurrent weight
    rows of all the unit's gates."""
    rnn = layer_call(module, len(vertex.predecessors)).layer
    hidden, suffixes = rnn.hidden_size, ["", "_reverse"][:_directions(rnn)]
    filters = []
    for suffix in suffixes:
        rows = torch.cat([getattr(rnn, f"weight_ih_l0{suffix}"), getattr(rnn, f"weight_hh_l0{suffix}")], 1)
        filters.append(rows.reshape(-1, hidden, rows.shape[1]).transpose(0, 1).flatten(1))
    return ChannelWeight(torch.cat(filters), 0)


# ------------------------------------------------------------------------------- examples
class _Tagger(nn.Module):
    """Features -> a bidirectional two-layer recurrent layer -> per-step and final-state heads."""

    def __init__(self, layer_type: type):
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.rnn = layer_type(6, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.step_head, self.state_head = nn.Linear(10, 2), nn.Linear(5, 2)
        self.has_cell_state = layer_type is nn.LSTM

    def forward(self, x):
        output, state = self.rnn(self.embed(x))
        final = state[0] if self.has_cell_state else state  # h_n of (h_n, c_n)
        return self.step_head(output) + self.state_head(final[-1]).unsqueeze(1)


def _example(layer_type: type):
    return lambda: (_Tagger(layer_type), (torch.randn(2, 4, 3),))


SPECS = (
    OpSpec("lstm", (nn.LSTM,), flops=recurrent_flops, coupling=recurrent_coupling,
           removal=remove_from_recurrent, masking=mask_recurrent, importance=unit_filters,
           accepts_calls=True, example=_example(nn.LSTM)),
    OpSpec("gru", (nn.GRU,), flops=recurrent_flops, coupling=recurrent_coupling,
           removal=remove_from_recurrent, masking=mask_recurrent, importance=unit_filters,
           accepts_calls=True, example=_example(nn.GRU)),
    OpSpec("rnn", (nn.RNN,), flops=recurrent_flops, coupling=recurrent_coupling,
           removal=remove_from_recurrent, masking=mask_recurrent, importance=unit_filters,
           accepts_calls=True, example=_example(nn.RNN)),
    OpSpec("recurrent_other", (nn.RNNBase, nn.RNNCellBase), flops=recurrent_flops,
           coupling=opaque_coupling),
)
