"""Tensors made to the shape of channel-tracked tensors keep their channels (zeros_like,
new_zeros, zeros sized from a shape, full_like), and rows accumulated by index_add keep them too;
along a channel axis they are barred."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dagprune
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups
from gate_states import assert_removal_matches_gates, random_gate_states

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_MAKERS = {
    "zeros_like": lambda h: torch.zeros_like(h),
    "new_zeros": lambda h: h.new_zeros(h.shape),
    "zeros_from_sizes": lambda h: torch.zeros(h.shape[0], h.shape[1]),
    "full_like": lambda h: torch.full_like(h, 0.5),
    "randn_like_times_zero": lambda h: torch.randn_like(h) * 0.0,
}


class _Shifted(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.encode, self.head, self.make = nn.Linear(8, 32), nn.Linear(32, 4), make

    def forward(self, x):
        hidden = torch.relu(self.encode(x))
        return self.head(hidden + self.make(hidden))


@pytest.mark.parametrize("name", sorted(_MAKERS))
def test_a_tensor_made_to_a_tracked_shape_keeps_its_channels(name):
    torch.manual_seed(0)
    model, x = _Shifted(_MAKERS[name]).eval(), torch.randn(3, 8)
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(x,))
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert torch.equal(expected, dag(x))
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=(x,))
    gated = pruning.prepare_for_pruning()
    assert [group.name for group in pruning.prunable_groups] == ["encode"]
    for _ in random_gate_states(pruning, seed=2, count=2):
        assert_removal_matches_gates(pruning, gated, (x,))


class _SegmentSums(nn.Module):
    """Per-segment sums of features (a graph network's pooling) into zeros of the features' width."""

    def __init__(self, literal_width: bool = False):
        super().__init__()
        self.encode, self.head, self.literal_width = nn.Linear(4, 16), nn.Linear(16, 2), literal_width

    def forward(self, x, segment):
        hidden = torch.relu(self.encode(x))
        width = 16 if self.literal_width else hidden.shape[1]
        return self.head(torch.zeros(3, width).index_add(0, segment, hidden))


@pytest.mark.parametrize("literal_width", [False, True], ids=["width-read", "width-literal"])
def test_index_add_into_zeros_keeps_the_channels(literal_width):
    # a literal width makes the zeros a constant of the graph, which removal slices like a weight
    torch.manual_seed(0)
    inputs = (torch.randn(7, 4), torch.tensor([0, 1, 2, 2, 1, 0, 0]))
    dag = dagprune.build_from_unstructured_module(_SegmentSums(literal_width).eval(), example_inputs=inputs)
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=inputs)
    gated = pruning.prepare_for_pruning()
    assert pruning.prunable_proportion == pytest.approx(1.0)
    for _ in random_gate_states(pruning, seed=3, count=2):
        assert_removal_matches_gates(pruning, gated, inputs)


def test_sizes_given_separately_trace_without_example_inputs():
    model, x = _Shifted(_MAKERS["zeros_from_sizes"]).eval(), torch.randn(3, 8)
    dag = dagprune.build_from_unstructured_module(model)  # symbolic: torch.zeros(proxy, proxy)
    assert torch.equal(model(x), dag(x)) and dag(torch.randn(5, 8)).shape == (5, 4)
    pruning = ChannelPruning(dag, (8,), 0.5, 10)
    pruning.prepare_for_pruning()
    assert [group.name for group in pruning.prunable_groups] == ["encode"]


def test_index_add_along_a_channel_axis_bars_it():
    class Scattered(nn.Module):
        def __init__(self):
            super().__init__()
            self.encode, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            hidden = self.encode(x)
            return self.head(torch.zeros_like(hidden).index_add(1, torch.tensor([5, 4, 3, 2, 1, 0]), hidden))

    dag = dagprune.build_from_unstructured_module(Scattered().eval())
    analysis = find_channel_groups(dag, (4,))
    assert any("index_add along a channel axis" in group.reason for group in analysis.groups)
    assert not analysis.prunable_groups

