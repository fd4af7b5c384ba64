"""``torch.einsum`` follows channels by the equation's letters: kept indices pass channels
through, summed indices consume them (masked there, removed from every operand), an index
shared with an untracked operand is barred, and a diagonal leaves the op opaque. Every case is
checked the way the op-spec test checks a spec: exact removal under random gates, and the
slim model's FLOPs as the gates predict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dagprune
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups
from gate_states import assert_removal_matches_gates, random_gate_states

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class _Bilinear(nn.Module):
    """Channels mixed by a weight table, then contracted with a second branch, through
    einsums with broadcast batch axes and a sum within one operand."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(4, 6), nn.Linear(4, 6)
        self.mix = nn.Parameter(torch.randn(6, 6, 5))
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        mixed = torch.einsum("...i,ijk->...jk", self.left(x), self.mix)
        paired = torch.einsum("...jk,...j->...k", mixed, self.right(x))
        return self.head(paired) + torch.einsum("bnj->bn", self.right(x)).unsqueeze(-1)


class _AgainstConstant(nn.Module):
    """A contraction with a constant (untracked) table bars the contracted channels."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        y = self.proj(x)
        table = torch.arange(36.0, dtype=y.dtype).reshape(6, 6)  # made in forward: not tracked
        return self.head(torch.einsum("bc,cd->bd", y, table))


class _Diagonal(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)

    def forward(self, x):
        y = self.proj(x)
        return torch.einsum("bii->bi", torch.einsum("bi,bj->bij", y, y))


def _prepared(model, example):
    dag = dagprune.build_from_unstructured_module(model, example_inputs=example)
    pruning = ChannelPruning(dag, None, 0.9, 1, example_inputs=example)
    pruning.prepare_for_pruning()
    return dag, pruning


def test_einsum_with_broadcast_axes_and_a_weight_table_prunes_and_removes_exactly():
    torch.manual_seed(0)
    example = (torch.randn(2, 3, 4),)
    dag, pruning = _prepared(_Bilinear().eval(), example)
    producers = [{vertex.name for vertex, _ in group.producers} for group in pruning.prunable_groups]
    assert {"left"} <= set().union(*producers) and {"right"} <= set().union(*producers)
    gated = pruning.pruning_model.eval()
    for _ in random_gate_states(pruning, seed=0):
        assert_removal_matches_gates(pruning, gated, example)  # outputs and FLOPs


def test_einsum_against_an_untracked_table_bars_the_contracted_channels():
    torch.manual_seed(0)
    dag = dagprune.build_from_unstructured_module(_AgainstConstant().eval())
    (proj,) = [g for g in find_channel_groups(dag, (4,)).groups if any(v.name == "proj" for v, _ in g.producers)]
    assert not proj.prunable and proj.reason.endswith("einsum index shared with an untracked operand")


def test_einsum_diagonal_is_opaque():
    torch.manual_seed(0)
    dag = dagprune.build_from_unstructured_module(_Diagonal().eval())
    with pytest.raises(dagprune.errors.PruningError, match="no prunable channel group"):
        ChannelPruning(dag, (4,), 0.9, 1).prepare_for_pruning()
