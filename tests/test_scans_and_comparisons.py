"""Channels through sorts, top-k, running maxima, ``(values, indices)`` results read by name,
comparisons and masked fills: followed where rows are independent, barred where the op picks
among channels by their values (or, as an embedding with ``max_norm``, mixes them)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dagprune
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups
from gate_states import assert_removal_matches_gates, random_gate_states

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _TokenConvPool(nn.Module):
    """Token embeddings through a 1-d conv, a layer norm, then the maximum over tokens read as
    ``.values`` (a text CNN's max-pooling)."""

    def __init__(self):
        super().__init__()
        self.embed, self.conv = nn.Embedding(50, 16), nn.Conv1d(16, 32, 3, padding=1)
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, 4)

    def forward(self, ids):
        hidden = self.norm(self.conv(self.embed(ids).transpose(1, 2)).transpose(1, 2))
        return self.head(hidden.max(1).values)


class _RankedPooling(nn.Module):
    """Top-k and sorted positions, a running maximum, and ``values, indices = torch.min(...)``."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 3), nn.Linear(16 * 4, 2)

    def forward(self, x):
        y = self.conv(x).flatten(2)
        top = torch.topk(y, 2, dim=-1).values.sort(dim=-1, descending=True).values
        running = y.cummax(dim=-1).values[..., -1:]
        low, _ = torch.min(y, dim=-1, keepdim=True)
        return self.head(torch.cat([top, running, low], -1).flatten(1))


class _Thresholded(nn.Module):
    """Comparisons, logical ops, ``where`` and ``masked_fill`` on a conv's output."""

    def __init__(self):
        super().__init__()
        self.conv, self.mix = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        keep = torch.logical_and(y.gt(-1.0), ~torch.isnan(y))
        y = torch.where(y > 0, y, 0.1 * y).masked_fill(~keep, 0.0)
        return self.mix(y + (y >= 0.5).float() - (y < -0.5).to(y.dtype))


class _TopChannels(nn.Module):
    """Top-k over the channel axis: which channels it keeps depends on their values."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(torch.topk(self.conv(x), 3, dim=1).values)


@pytest.mark.parametrize("model, inputs", [
    (_TokenConvPool(), (torch.randint(0, 50, (2, 9)),)),
    (_RankedPooling(), (torch.randn(2, 3, 6, 6),)),
    (_Thresholded(), (torch.randn(2, 3, 6, 6),)),
], ids=["max-values", "topk-sort-cummax-min", "comparisons"])
def test_rows_along_other_axes_keep_their_channels_and_remove_exactly(model, inputs):
    torch.manual_seed(0)
    model.eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=inputs)
    with torch.no_grad():
        assert torch.equal(model(*inputs), dag(*inputs))
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=inputs)
    gated = pruning.prepare_for_pruning()
    assert pruning.prunable_proportion == pytest.approx(1.0, abs=0.02)
    for _ in random_gate_states(pruning, seed=4, count=2):
        assert_removal_matches_gates(pruning, gated, inputs)


def test_a_top_k_over_channels_bars_them():
    inputs = (torch.randn(1, 3, 6, 6),)
    dag = dagprune.build_from_unstructured_module(_TopChannels().eval(), example_inputs=inputs)
    analysis = find_channel_groups(dag, example_inputs=inputs)
    reasons = [group.reason for group in analysis.groups]
    assert any("topk along a channel axis" in reason for reason in reasons), reasons
    assert not any(group.name == "conv" for group in analysis.prunable_groups)


def test_an_embedding_with_max_norm_is_a_group_kept_whole_with_its_reason():
    model = nn.Sequential(nn.Embedding(30, 8, max_norm=1.0), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    ids = torch.randint(0, 30, (2, 5))
    dag = dagprune.build_from_unstructured_module(model)
    analysis = find_channel_groups(dag, example_inputs=(ids,))
    reasons = {group.name: group.reason for group in analysis.groups}
    assert "max_norm" in reasons["0"] and [group.name for group in analysis.prunable_groups] == ["1"]
