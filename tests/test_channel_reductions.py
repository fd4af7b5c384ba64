"""Reductions over a channel axis that the gated model computes over kept channels only:
maxima (CBAM's spatial attention) and variances (hand-written layer norms)."""

from __future__ import annotations

import torch
from torch import nn

import dagprune
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups
from gate_states import assert_removal_matches_gates, random_gate_states


class _Cbam(nn.Module):
    """A conv, then CBAM: channel attention from average and max pooling through a shared MLP,
    spatial attention from the mean and the max over channels through a 7x7 conv."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.mlp = nn.Sequential(nn.Conv2d(channels, 4, 1), nn.ReLU(), nn.Conv2d(4, channels, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        self.head = nn.Conv2d(channels, 5, 1)

    def forward(self, x):
        x = self.conv(x)
        x = x * torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))
        pooled = torch.cat([x.mean(1, keepdim=True), torch.max(x, dim=1, keepdim=True)[0]], dim=1)
        return self.head(x * torch.sigmoid(self.spatial(pooled)))


class _LayerNorm2d(nn.Module):
    """A channels-first layer norm written with ``var_mean`` over the channel axis."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, channels, 1), nn.Conv2d(channels, 2, 1)
        self.weight, self.bias = nn.Parameter(torch.rand(channels) + 0.5), nn.Parameter(torch.randn(channels))

    def forward(self, x):
        x = self.conv(x)
        variance, mean = torch.var_mean(x, dim=1, keepdim=True, unbiased=False)
        x = (x - mean) / torch.sqrt(variance + 1e-6)
        return self.head(x * self.weight[:, None, None] + self.bias[:, None, None])


def _check_prunable_and_exact(model: nn.Module, name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    dag = dagprune.build_from_unstructured_module(model.eval())
    assert dagprune.max_relative_difference(model(x), dag(x)) <= 1e-6
    group = {g.name: g for g in find_channel_groups(dag, (3, 6, 6)).groups}[name]
    assert group.prunable, group.reason
    config = ChannelPruning(dag, (3, 6, 6), 0.5, 1)
    gated = config.prepare_for_pruning().eval()
    for _ in random_gate_states(config, seed=2):
        assert_removal_matches_gates(config, gated, (x,))


def test_cbam_prunes_through_its_max_over_channels_and_removal_is_exact():
    torch.manual_seed(0)
    _check_prunable_and_exact(_Cbam(), "conv")


def test_a_layer_norm_written_with_var_mean_prunes_and_removal_is_exact():
    torch.manual_seed(0)
    _check_prunable_and_exact(_LayerNorm2d(), "conv")


def test_a_max_whose_indices_are_read_stays_a_barrier():
    class ArgMax(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(1, 2, 1)

        def forward(self, x):
            best = torch.max(self.conv(x), dim=1, keepdim=True)
            return self.head(best.values * best.indices.float())

    dag = dagprune.build_from_unstructured_module(ArgMax().eval())
    group = {g.name: g for g in find_channel_groups(dag, (3, 6, 6)).groups}["conv"]
    assert not group.prunable and "max over a channel axis" in group.reason
