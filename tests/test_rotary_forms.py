"""Rotary position embeddings written the GPT-J way (CodeGen, ChatGLM): angles gathered from a
table of positions, split at half of its width read at run time, each repeated twice in place
(``repeat_interleave(2, dim)``), and the head dims rotated in interleaved pairs. The query and
key dims stay prunable (a pair at a time) and the slim model runs at other sizes."""

from __future__ import annotations

import torch
from torch import nn

import dagprune
from gate_states import slim_models_matching_gates
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups


def _rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class _InterleavedRotary(nn.Module):
    def __init__(self, width: int = 16, heads: int = 2, positions: int = 32):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        inv_freq = 1.0 / 100 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.arange(positions).float()[:, None] * inv_freq
        self.register_buffer("sincos", torch.cat([angles.sin(), angles.cos()], dim=-1))

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = (layer(x).view(batch, length, self.heads, self.head_dim) for layer in (self.q, self.k, self.v))
        sincos = self.sincos[torch.arange(length)][None]
        sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
        sin, cos = torch.repeat_interleave(sin[:, :, None, :], 2, 3), torch.repeat_interleave(cos[:, :, None, :], 2, 3)
        q, k = q * cos + _rotate_every_two(q) * sin, k * cos + _rotate_every_two(k) * sin
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim ** -0.5
        attended = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
        return self.out(attended.reshape(batch, length, width))


def test_interleaved_rotary_angles_repeated_in_place_keep_query_and_key_dims_prunable():
    # repeat_interleave along the angles' channel axis barred them, and with them every query
    # and key dim they multiply (GPT-J)
    torch.manual_seed(0)
    example, other = (torch.randn(2, 5, 16),), (torch.randn(3, 7, 16),)
    dag = dagprune.build_from_unstructured_module(_InterleavedRotary().eval(), example_inputs=example)
    query = next(g for g in find_channel_groups(dag, example_inputs=example).groups
                 if any(v.name == "q" for v, _ in g.producers))
    assert query.prunable, query.reason
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    slim_models_matching_gates(pruning, gated, example, [other])
