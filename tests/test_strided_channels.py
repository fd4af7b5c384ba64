"""Strided slices of a channel axis: ``x[..., ::2]`` and ``x[..., 1::2]`` (interleaved rotary
embeddings) tie each block of channels, so the same slices of the slim tensor pick the same
channels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dagprune
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups
from gate_states import assert_removal_matches_gates, random_gate_states


class _InterleavedRope(nn.Module):
    """Attention whose q and k are rotated pairwise by an interleaved rotary embedding (EVA-02's
    form), the sin / cos tables being buffers over the head dims."""

    def __init__(self, dim: int = 8, tokens: int = 5):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(6, dim) for _ in range(3))
        self.out = nn.Linear(dim, 3)
        angles = torch.arange(tokens)[:, None] * torch.rand(dim // 2).repeat_interleave(2)[None]
        self.register_buffer("sin", angles.sin())
        self.register_buffer("cos", angles.cos())

    @staticmethod
    def rotate(x):
        return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)

    def forward(self, x):
        q, k = (t * self.cos + self.rotate(t) * self.sin for t in (self.q(x), self.k(x)))
        return self.out((q @ k.transpose(-2, -1)).softmax(-1) @ self.v(x))


def test_an_interleaved_rotary_embedding_prunes_its_head_dims_in_pairs():
    torch.manual_seed(0)
    model, x = _InterleavedRope().eval(), torch.randn(2, 5, 6)
    dag = dagprune.build_from_unstructured_module(model)
    assert dagprune.max_relative_difference(model(x), dag(x)) == 0.0
    groups = {g.name: g for g in find_channel_groups(dag, (5, 6)).groups}
    assert groups["q"].prunable and groups["q"].size == 4  # 8 head dims, rotated in 4 pairs
    config = ChannelPruning(dag, (5, 6), 0.5, 1)
    gated = config.prepare_for_pruning().eval()
    for _ in random_gate_states(config, seed=3):
        assert_removal_matches_gates(config, gated, (x,))
    slim = config.remove_channels()
    q = next(v.module for v in slim.inner_vertices if v.name == "q")
    assert q.out_features % 2 == 0


@pytest.mark.parametrize("index", [(Ellipsis, slice(2, None, 2)), (Ellipsis, slice(None, None, 3)),
                                   (Ellipsis, slice(0, 6, 2))], ids=["start past a block", "odd blocks",
                                                                     "stops early"])
def test_other_strided_slices_of_a_channel_axis_are_barriers(index):
    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.up(x)
            return self.down(torch.cat([h[index], h[..., :8 - h[index].shape[-1]]], -1))

    dag = dagprune.build_from_unstructured_module(Strided().eval())
    group = {g.name: g for g in find_channel_groups(dag, (4,)).groups}["up"]
    assert not group.prunable and "strided slice of a channel axis" in group.reason
