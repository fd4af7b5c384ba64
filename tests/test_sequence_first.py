"""Sequence-first attention written by hand (fairseq, ESPnet, FSMT): ``(T, B, C)`` inputs, the
batch merged with the heads (``q.view(T, B * heads, dim)``). The slim model must run at every
batch size, as the converted one does."""

from __future__ import annotations

import torch
from torch import nn

import dagprune
from gate_states import slim_models_matching_gates
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups


class _SequenceFirstAttention(nn.Module):
    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, width))

    def forward(self, x):  # (T, B, C)
        length, batch, width = x.shape
        q = self.q(x).contiguous().view(length, batch * self.heads, self.head_dim).transpose(0, 1)
        k = self.k(x).contiguous().view(-1, batch * self.heads, self.head_dim).transpose(0, 1)
        v = self.v(x).contiguous().view(-1, batch * self.heads, self.head_dim).transpose(0, 1)
        attended = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.35, dim=-1), v)
        h = x + self.out(attended.transpose(0, 1).contiguous().view(length, batch, width))
        return h + self.mlp(h)


def test_batch_merged_with_heads_stays_a_run_time_size_after_removal(tmp_path):
    # `batch * heads` was written into the slim model as the example's number: it ran only at
    # the example's batch size ("shape '[7, 8, 1]' is invalid")
    torch.manual_seed(0)
    example, others = (torch.randn(5, 2, 16),), [(torch.randn(7, 3, 16),), (torch.randn(4, 1, 16),)]
    model = _SequenceFirstAttention().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=example)
    for x in others:
        assert dagprune.max_relative_difference(model(*x), dag(*x)) <= 1e-6
    head_dims = next(g for g in find_channel_groups(dag, example_inputs=example).groups
                     if any(v.name == "q" for v, _ in g.producers))
    assert head_dims.prunable, head_dims.reason
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    for slim in slim_models_matching_gates(pruning, gated, example, others):
        loaded = dagprune.load_dag(slim.save(tmp_path / "slim"))
        with torch.no_grad():
            for x in others:
                assert torch.equal(loaded(*x), slim(*x))
