"""Sub-pixel shuffles (nn.PixelShuffle, F.pixel_unshuffle) let channels through in blocks."""

from __future__ import annotations

import torch
from torch import nn

import dagprune
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups
from gate_states import assert_removal_matches_gates, random_gate_states


class _Upsampler(nn.Module):
    """An EDSR-style tail: a body, then a conv to 4x the features, a 2x pixel shuffle, a conv
    to RGB."""

    def __init__(self, features: int = 8):
        super().__init__()
        self.head = nn.Conv2d(3, features, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.ReLU())
        self.expand = nn.Conv2d(features, 4 * features, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.tail = nn.Conv2d(features, 3, 3, padding=1)

    def forward(self, x):
        features = self.head(x)
        return self.tail(self.shuffle(self.expand(features + self.body(features))))


def test_the_filters_of_one_shuffled_channel_form_one_class_and_are_removed_together():
    torch.manual_seed(0)
    model, x = _Upsampler().eval(), torch.randn(2, 3, 6, 6)
    dag = dagprune.build_from_unstructured_module(model)
    groups = {g.name: g for g in find_channel_groups(dag, (3, 6, 6)).prunable_groups}
    assert groups["expand"].size == 8  # 32 filters, 4 per output channel of the shuffle
    config = ChannelPruning(dag, (3, 6, 6), 0.5, 1)
    gated = config.prepare_for_pruning().eval()
    assert config.prunable_proportion > 0.99  # the expanding conv was not prunable before
    for _ in random_gate_states(config, seed=1):
        assert_removal_matches_gates(config, gated, (x,))
    kept = int(config.gates[[g.name for g in config.prunable_groups].index("expand")].hard_mask().sum())
    slim = config.remove_channels()
    expand = next(v.module for v in slim.inner_vertices if v.name == "expand")
    assert expand.out_channels == 4 * kept


def test_a_shuffle_factor_read_from_the_input_is_a_barrier_not_an_error():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.out(torch.nn.functional.pixel_shuffle(self.conv(x), x.shape[-1] // 3))

    model, x = Dynamic().eval(), torch.randn(1, 3, 6, 6)
    dag = dagprune.build_from_unstructured_module(model)  # symbolic: the factor is computed in the graph
    assert torch.equal(dag(x), model(x))
    groups = {g.name: g for g in find_channel_groups(dag, (3, 6, 6)).groups}
    assert not groups["conv"].prunable and "shuffle factor" in groups["conv"].reason
