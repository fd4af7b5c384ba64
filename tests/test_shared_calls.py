"""A module called more than once shares its weights: every call loses the same channels, and
the slim model shares its copy again (a Siamese encoder, a block applied twice, ALBERT)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dagprune
from gate_states import assert_removal_matches_gates, random_gate_states
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups


class _Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16))
        self.head = nn.Linear(16, 1)

    def forward(self, a, b):
        return self.head((self.encoder(a) - self.encoder(b)).abs())


class _BlockTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(6, 8), nn.Linear(8, 2)
        self.block = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))

    def forward(self, x):
        h = self.embed(x)
        h = h + self.block(h)
        return self.head(h + self.block(h))


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared parameters counted once


@pytest.mark.parametrize("model, example", [
    (_Siamese, (torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6))),
    (_BlockTwice, (torch.randn(2, 6),)),
], ids=["siamese", "block_twice"])
def test_every_call_of_a_shared_module_loses_the_same_channels(model, example):
    # each call was pruned on its own: the slim model held one differing copy per call
    torch.manual_seed(0)
    model = model().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=example)
    names = [g.name for g in find_channel_groups(dag, example_inputs=example).groups]
    assert len(names) == len(set(names))  # one group per shared layer, not one per call
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    for _ in random_gate_states(pruning, seed=0, count=3):
        slim = assert_removal_matches_gates(pruning, gated, example)
        layers = [v.module for v in slim.inner_vertices if isinstance(v.module, (nn.Linear, nn.Conv2d))]
        assert len({id(layer.weight) for layer in layers}) < len(layers)  # shared again
        assert _parameter_count(slim) <= _parameter_count(model)


def test_albert_shared_layers_stay_shared_after_removal():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.AlbertConfig(vocab_size=64, embedding_size=8, hidden_size=16, num_hidden_layers=3,
                                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    model = transformers.AlbertModel(config).eval()
    example = {"input_ids": torch.randint(0, 64, (2, 7))}
    dag = dagprune.build_from_unstructured_module(model, example_inputs=example)
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    for _ in random_gate_states(pruning, seed=1, count=2):
        slim = pruning.remove_channels().eval()
        with torch.no_grad():
            assert dagprune.max_relative_difference(gated.eval()(**example).last_hidden_state,
                                                    slim(**example).last_hidden_state) <= 1e-4
        assert _parameter_count(slim) < _parameter_count(model)
