"""Recurrent layers (LSTM, GRU, RNN) and nn.MultiheadAttention are prunable, exactly.

Hidden units of a recurrent layer are one channel group (all layers and directions), removed
with all their gates; attention layers lose input and output features and head dims (or whole
heads). For random gate states and for groups whose gates are all closed, the slim model
computes what the gated model computes, with the FLOPs the gates predict, saves and loads, and
every gate logit receives a gradient.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import dagprune
from dagprune.ops import ModuleCallOp, PrunedMultiheadAttention, spec_for
from dagprune_algorithms.pruning import ChannelMutator, ChannelPruning, find_channel_groups
from gate_states import assert_removal_matches_gates, random_gate_states

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------- models
class _Tagger(nn.Module):
    """Features -> recurrent layer -> a per-step head and a head on the last layer's final state."""

    def __init__(self, layer_type: type, num_layers: int = 2, bidirectional: bool = True,
                 batch_first: bool = True, read_cell_state: bool = False):
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.rnn = layer_type(6, 5, num_layers=num_layers, bidirectional=bidirectional,
                              batch_first=batch_first)
        self.step_head = nn.Linear(5 * (2 if bidirectional else 1), 2)
        self.state_head = nn.Linear(5, 2)
        self.state_index = (1 if read_cell_state else 0) if layer_type is nn.LSTM else None

    def forward(self, x):
        output, state = self.rnn(self.embed(x))
        final = state if self.state_index is None else state[self.state_index]
        return self.step_head(output), self.state_head(final[-1])


class _Unbatched(nn.Module):
    """A ReLU RNN on a sequence without a batch axis; its final states are summed."""

    def __init__(self):
        super().__init__()
        self.embed, self.head, self.state_head = nn.Linear(3, 6), nn.Linear(10, 2), nn.Linear(5, 2)
        self.rnn = nn.RNN(6, 5, num_layers=2, bidirectional=True, nonlinearity="relu")

    def forward(self, x):
        output, state = self.rnn(self.embed(x))
        return self.head(output), self.state_head(state.sum(0))


class _EncoderDecoder(nn.Module):
    """An encoder's final state starts a decoder (a tuple ``(h, c)`` for LSTMs)."""

    def __init__(self, layer_type: type):
        super().__init__()
        self.encoder, self.decoder = layer_type(4, 6, batch_first=True), layer_type(3, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, source, target):
        _, state = self.encoder(source)
        output, _ = self.decoder(target, state)
        return self.head(output)


class _SelfAttention(nn.Module):
    """A residual self-attention block called with keywords (a ModuleCallOp)."""

    def __init__(self, batch_first: bool = True, need_weights: bool = False, heads: int = 4,
                 per_head_mask: bool = False):
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.attention = nn.MultiheadAttention(16, heads, batch_first=batch_first)
        self.head = nn.Linear(16, 3)
        self.need_weights, self.per_head_mask = need_weights, per_head_mask

    def forward(self, x, padding, causal):
        h = self.embed(x)
        mask = causal.repeat(x.shape[0] * self.attention.num_heads, 1, 1) if self.per_head_mask else causal
        mixed = self.attention(h, h, h, key_padding_mask=padding, attn_mask=mask,
                               need_weights=self.need_weights)[0]
        return self.head(h + mixed)


class _CrossAttention(nn.Module):
    """Queries attend to a memory of other widths (kdim, vdim), called positionally."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(5, 8), nn.Linear(4, 6), nn.Linear(4, 10)
        self.attention = nn.MultiheadAttention(8, 2, kdim=6, vdim=10, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x, memory):
        return self.head(self.attention(self.query(x), self.key(memory), self.value(memory))[0])


def _sequence(batch_first: bool, *shape) -> torch.Tensor:
    batch, steps, features = shape
    return torch.randn(batch, steps, features) if batch_first else torch.randn(steps, batch, features)


def _attention_inputs(batch_first: bool = True):
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, 3:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    return _sequence(batch_first, 2, 5, 5), padding, causal


# ------------------------------------------------------------------------------- helpers
def _prepare(model: nn.Module, inputs: tuple, head_pruning: str = "dims"):
    torch.manual_seed(0)
    model.eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=inputs)
    with torch.no_grad():
        assert dagprune.max_relative_difference(model(*inputs), dag(*inputs)) <= 1e-5
    config = ChannelPruning(dag, None, 0.5, 10, example_inputs=inputs, head_pruning=head_pruning)
    gated = config.prepare_for_pruning()
    with torch.no_grad():  # every gate open: the gated model is the model
        assert dagprune.max_relative_difference(model(*inputs), gated.eval()(*inputs)) <= 1e-5
    return config, gated


def _check_removal(config, gated, inputs) -> list:
    """Random gate states, then every group closed (each keeps its best channel)."""
    slims = []
    for _ in random_gate_states(config, seed=1):
        slims.append(assert_removal_matches_gates(config, gated, inputs))
    for gate in config.gates:
        gate.logits.data = -torch.rand(gate.logits.shape) - 0.1
    slims.append(assert_removal_matches_gates(config, gated, inputs))
    return slims


def _check_gradients(config, gated, inputs) -> None:
    gated.train()
    torch.manual_seed(0)
    outputs = gated(*inputs)
    sum(t.square().sum() for t in (outputs if isinstance(outputs, tuple) else (outputs,))).backward()
    config.expected_proportion().backward()
    for group, gate in zip(config.prunable_groups, config.gates):
        assert gate.logits.grad is not None and bool((gate.logits.grad != 0).all()), group.name
        assert torch.isfinite(gate.logits.grad).all()


def _check_round_trip(slim, inputs, tmp_path) -> None:
    slim.eval()
    loaded = dagprune.load_dag(slim.save(tmp_path / "slim"))
    with torch.no_grad():
        expected, actual = slim(*inputs), loaded.eval()(*inputs)
    for a, b in zip(expected if isinstance(expected, tuple) else (expected,),
                    actual if isinstance(actual, tuple) else (actual,)):
        assert torch.equal(a, b)


def _group_sizes(config) -> dict:
    return {(group.name, group.size) for group in config.prunable_groups}


# ------------------------------------------------------------------------------- recurrent
RECURRENT_CASES = [
    (nn.LSTM, 2, True, True, False), (nn.LSTM, 1, False, False, True), (nn.LSTM, 3, True, False, True),
    (nn.GRU, 2, True, True, False), (nn.GRU, 1, False, False, False), (nn.RNN, 2, True, False, False),
]


@pytest.mark.parametrize("layer_type, num_layers, bidirectional, batch_first, read_cell_state",
                         RECURRENT_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_recurrent_units_are_one_group_and_removal_is_exact(layer_type, num_layers, bidirectional,
                                                            batch_first, read_cell_state, tmp_path):
    model = _Tagger(layer_type, num_layers, bidirectional, batch_first, read_cell_state)
    inputs = (_sequence(batch_first, 2, 4, 3),)
    config, gated = _prepare(model, inputs)
    assert _group_sizes(config) == {("embed", 6), ("rnn", 5)}
    slims = _check_removal(config, gated, inputs)
    layer = next(v.module for v in slims[-1].inner_vertices if v.name == "rnn")
    assert type(layer) is layer_type and (layer.input_size, layer.hidden_size) == (1, 1)
    assert layer.num_layers == num_layers and layer.batch_first == batch_first
    _check_round_trip(slims[0], inputs, tmp_path)
    _check_gradients(config, gated, inputs)


def test_the_dag_saves_after_its_gated_model_ran(tmp_path):
    """The gated model runs a shared recurrent layer with masked weights (functional_call),
    which leaves them in the layer's list of flat weights unless refreshed: saving the DAG right
    after failed (the list held tensors that are not the layer's own)."""
    model = _Tagger(nn.LSTM, 2, True, True, False)
    inputs = (_sequence(True, 2, 4, 3),)
    config, gated = _prepare(model, inputs)
    dag = config.model
    with torch.no_grad():
        gated.eval()(*inputs)
    layer = next(v.module for v in dag.inner_vertices if v.name == "rnn")
    assert all(weight is getattr(layer, name) for weight, name in zip(layer._flat_weights, layer._flat_weights_names))
    _check_round_trip(dag, inputs, tmp_path)


def test_unbatched_sequences_are_followed(tmp_path):
    inputs = (torch.randn(4, 3),)
    config, gated = _prepare(_Unbatched(), inputs)
    assert _group_sizes(config) == {("embed", 6), ("rnn", 5)}
    _check_round_trip(_check_removal(config, gated, inputs)[0], inputs, tmp_path)


@pytest.mark.parametrize("layer_type", [nn.LSTM, nn.GRU])
def test_initial_state_joins_the_units_of_the_layer_that_made_it(layer_type, tmp_path):
    inputs = (torch.randn(2, 5, 4), torch.randn(2, 3, 3))
    config, gated = _prepare(_EncoderDecoder(layer_type), inputs)
    [group] = config.prunable_groups
    assert group.size == 6 and {v.qualified_name for v, _ in group.producers} == {"encoder", "decoder"}
    slims = _check_removal(config, gated, inputs)
    _check_round_trip(slims[0], inputs, tmp_path)
    _check_gradients(config, gated, inputs)


class _StartedByLinear(nn.Module):
    """An LSTM called with constant arguments or with ``(h_0, c_0)`` made from the input."""

    def __init__(self, with_state: bool):
        super().__init__()
        self.embed, self.start = nn.Linear(3, 6), nn.Linear(3, 5)
        self.rnn, self.head = nn.LSTM(6, 5, batch_first=True), nn.Linear(5, 2)
        self.with_state = with_state

    def forward(self, x):
        if self.with_state:
            state = self.start(x[:, 0]).unsqueeze(0)
            return self.head(self.rnn(self.embed(x), (state, state.tanh()))[0])
        return self.head(self.rnn(self.embed(x), None)[0])


@pytest.mark.parametrize("with_state", [False, True], ids=["none", "from-linear"])
def test_layer_called_with_constant_arguments_is_followed(with_state, tmp_path):
    inputs = (torch.randn(2, 4, 3),)
    config, gated = _prepare(_StartedByLinear(with_state), inputs)
    call = next(v.module for v in config.model.inner_vertices if v.name == "rnn")
    assert isinstance(call, ModuleCallOp) and spec_for(call).name == "lstm"
    producers = {vertex.name for group in config.prunable_groups for vertex, _ in group.producers}
    assert producers == ({"embed", "rnn", "start"} if with_state else {"embed", "rnn"})
    slims = _check_removal(config, gated, inputs)
    _check_round_trip(slims[0], inputs, tmp_path)
    _check_gradients(config, gated, inputs)


class _GivenState(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Linear(3, 6), nn.GRU(6, 5), nn.Linear(5, 2)

    def forward(self, x, state):
        return self.head(self.rnn(self.embed(x), state)[0])


class _Projected(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Linear(3, 6), nn.LSTM(6, 5, proj_size=3), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.rnn(self.embed(x))[0])


@pytest.mark.filterwarnings("ignore:LSTM with projections")
@pytest.mark.parametrize("model, inputs, blocked, reason", [
    (_GivenState(), (torch.randn(4, 2, 3), torch.randn(1, 2, 5)), "rnn", "initial state"),
    (_Projected(), (torch.randn(4, 2, 3),), "embed", "does not say how its channels flow"),
], ids=["state-from-input", "projections"])
def test_units_the_layer_cannot_remove_are_barriers(model, inputs, blocked, reason):
    dag = dagprune.build_from_unstructured_module(model.eval(), example_inputs=inputs)
    analysis = find_channel_groups(dag, example_inputs=inputs)
    [group] = [g for g in analysis.groups if g.name == blocked]
    assert not group.prunable and reason in group.reason
    assert all(vertex.name != "rnn" for g in analysis.prunable_groups for vertex, _ in g.producers)


# ------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_self_attention_by_dims_keeps_the_scale_and_removes_exactly(batch_first, need_weights, tmp_path):
    inputs = _attention_inputs(batch_first)
    config, gated = _prepare(_SelfAttention(batch_first, need_weights), inputs)
    assert _group_sizes(config) == {("embed", 16), ("attention", 4)}  # q/k dims, v dims per head
    slims = _check_removal(config, gated, inputs)
    layer = next(v.module.module for v in slims[-1].inner_vertices if v.name == "attention")
    assert isinstance(layer, PrunedMultiheadAttention)
    assert (layer.num_heads, layer.head_dim, layer.value_head_dim) == (4, 1, 1)
    assert layer.scale == pytest.approx(1 / math.sqrt(4))
    _check_round_trip(slims[0], inputs, tmp_path)
    _check_gradients(config, gated, inputs)


def test_heads_mode_removes_whole_heads(tmp_path):
    inputs = _attention_inputs()
    config, gated = _prepare(_SelfAttention(need_weights=False), inputs, head_pruning="heads")
    assert _group_sizes(config) == {("embed", 16), ("attention", 4)}
    logits = {"embed": torch.full((16,), 3.0), "attention": torch.tensor([3.0, -3.0, 3.0, -3.0])}
    for group, gate in zip(config.prunable_groups, config.gates):
        gate.logits.data = logits[group.name].clone()
    slim = assert_removal_matches_gates(config, gated, inputs)
    layer = next(v.module.module for v in slim.inner_vertices if v.name == "attention")
    assert (layer.num_heads, layer.head_dim, layer.q_proj.in_features, layer.out_proj.out_features) == (2, 4, 16, 16)
    _check_removal(config, gated, inputs)
    _check_round_trip(slim, inputs, tmp_path)
    _check_gradients(config, gated, inputs)


@pytest.mark.parametrize("need_weights, per_head_mask", [(True, False), (False, True)],
                         ids=["averaged-weights", "per-head-mask"])
def test_heads_mode_prunes_dims_where_heads_cannot_go(need_weights, per_head_mask):
    inputs = _attention_inputs()
    model = _SelfAttention(need_weights=need_weights, per_head_mask=per_head_mask)
    config, gated = _prepare(model, inputs, head_pruning="heads")
    assert ("attention", 4) in _group_sizes(config)  # head_dim 4: dims, not the 4 heads
    assert sum(group.name == "attention" for group in config.prunable_groups) == 2
    _check_removal(config, gated, inputs)


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_with_other_key_and_value_widths(batch_first, tmp_path):
    inputs = (_sequence(batch_first, 2, 5, 5), _sequence(batch_first, 2, 7, 4))
    config, gated = _prepare(_CrossAttention(batch_first), inputs)
    # q/k dims and v dims (4 per head each), output features (8)
    assert _group_sizes(config) == {("query", 8), ("key", 6), ("value", 10), ("attention", 4), ("attention", 8)}
    slims = _check_removal(config, gated, inputs)
    layer = next(v.module for v in slims[-1].inner_vertices if v.name == "attention")
    assert (layer.k_proj.in_features, layer.v_proj.in_features, layer.num_heads) == (1, 1, 2)
    assert (layer.head_dim, layer.value_head_dim, layer.out_proj.out_features) == (1, 1, 1)
    _check_round_trip(slims[0], inputs, tmp_path)
    _check_gradients(config, gated, inputs)


def test_attention_flops_are_counted_by_formula():
    model = _CrossAttention().eval()
    inputs = (torch.randn(2, 5, 5), torch.randn(2, 7, 4))
    dag = dagprune.build_from_unstructured_module(model, example_inputs=inputs)
    flops = dagprune.count_flops(dag, example_inputs=inputs)
    projections = 2 * (10 * 8 * 8 + 14 * 6 * 8 + 14 * 10 * 8 + 10 * 8 * 8)
    products = 2 * 2 * (2 * 5 * 7 * 8)
    linears = 2 * (10 * 5 * 8 + 14 * 4 * 6 + 14 * 4 * 10 + 10 * 8 * 3)
    assert flops.total == projections + products + linears


class _BiasedKeys(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(5, 8), nn.Linear(8, 3)
        self.attention = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attention(h, h, h)[0])


def test_attention_with_key_biases_is_a_barrier():
    inputs = (torch.randn(2, 5, 5),)
    dag = dagprune.build_from_unstructured_module(_BiasedKeys().eval(), example_inputs=inputs)
    analysis = find_channel_groups(dag, example_inputs=inputs)
    assert not analysis.prunable_groups


# ------------------------------------------------------------------------------- units
@pytest.mark.parametrize("model, inputs", [
    (_Tagger(nn.LSTM), (torch.randn(2, 4, 3),)),
    (_CrossAttention(), (torch.randn(2, 5, 5), torch.randn(2, 7, 4))),
], ids=["lstm", "attention"])
def test_channel_units_export_exactly_and_rebuild_from_their_template(model, inputs):
    torch.manual_seed(0)
    dag = dagprune.build_from_unstructured_module(model.eval(), example_inputs=inputs)
    traced = ChannelMutator()
    traced.prepare_from_supernet(dag, example_inputs=inputs)
    traced.set_choices(traced.sample_choices(seed=3))
    with torch.no_grad():
        masked = traced.masked_model.eval()(*inputs)
        assert dagprune.max_relative_difference(masked, traced.remove_channels().eval()(*inputs)) <= 1e-4
    template = json.loads(json.dumps(traced.config_template(with_unit_init_args=True, with_channels=True)))
    rebuilt = ChannelMutator.from_config(template)  # parse mode "Config": units from the template
    rebuilt.prepare_from_supernet(dag, example_inputs=inputs)
    assert rebuilt.current_choices == traced.current_choices
    with torch.no_grad():
        assert dagprune.max_relative_difference(masked, rebuilt.masked_model.eval()(*inputs)) == 0


class _Decoder(nn.Module):
    """A cell stepped in the model's own loop, its state started by an encoder (or given as
    zeros of a literal width), one output per step."""

    def __init__(self, cell_type: type, zero_state: bool = False):
        super().__init__()
        self.start, self.embed = nn.Linear(4, 16), nn.Linear(4, 8)
        self.cell, self.head = cell_type(8, 16), nn.Linear(16, 3)
        self.zero_state, self.has_cell_state = zero_state, cell_type is nn.LSTMCell

    def forward(self, sequence):
        start = torch.zeros(sequence.shape[0], 16) if self.zero_state else torch.tanh(self.start(sequence.mean(1)))
        state = (start, start) if self.has_cell_state else start
        outputs = []
        for step in range(sequence.shape[1]):
            state = self.cell(torch.relu(self.embed(sequence[:, step])), state)
            outputs.append(self.head(state[0] if self.has_cell_state else state))
        return torch.stack(outputs, 1)


@pytest.mark.parametrize("cell_type", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_a_cell_stepped_in_a_loop_prunes_its_units_across_steps(cell_type, tmp_path):
    torch.manual_seed(0)
    model, x = _Decoder(cell_type).eval(), torch.randn(3, 5, 4)
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(x,))
    assert torch.equal(model(x), dag(x))
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=(x,))
    gated = pruning.prepare_for_pruning()
    assert pruning.prunable_proportion == pytest.approx(1.0)
    for _ in random_gate_states(pruning, seed=6, count=2):
        slim = assert_removal_matches_gates(pruning, gated, (x,))
    cells = [v.module.module if isinstance(v.module, ModuleCallOp) else v.module
             for v in slim.inner_vertices if "cell" in v.name]
    assert len(cells) == 5 and len({id(cell.weight_hh) for cell in cells}) == 1  # five steps, one weight
    slim.save(tmp_path / "slim")
    assert torch.equal(dagprune.load_dag(tmp_path / "slim")(x), slim(x))


def test_a_cell_state_of_literal_width_bars_the_units():
    x = torch.randn(2, 3, 4)
    dag = dagprune.build_from_unstructured_module(_Decoder(nn.GRUCell, zero_state=True), example_inputs=(x,))
    analysis = find_channel_groups(dag, example_inputs=(x,))
    reasons = [group.reason for group in analysis.groups if not group.prunable]
    assert any("initial state of a recurrent layer with untracked units" in reason for reason in reasons), reasons
    assert any(group.name == "embed" for group in analysis.prunable_groups)  # its input features still prune
