"""RMSNorm (nn.RMSNorm and F.rms_norm): LLaMA-style residual streams are prunable, exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dagprune
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups
from gate_states import assert_removal_matches_gates, random_gate_states


class _FeedForward(nn.Module):
    """Pre-norm SwiGLU block of a LLaMA-style decoder (attention left out)."""

    def __init__(self, dim: int, hidden: int, functional: bool):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.gate, self.up, self.down = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.functional = functional

    def forward(self, x):
        if self.functional:
            h = F.rms_norm(x, (x.shape[-1],), self.norm.weight, 1e-6)
        else:
            h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class _ResidualStream(nn.Module):
    def __init__(self, functional: bool = False, dim: int = 16, hidden: int = 24):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.Sequential(*[_FeedForward(dim, hidden, functional) for _ in range(2)])
        self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))))


def _randomize(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def test_linear_rms_norm_linear_is_prunable():
    model = _randomize(nn.Sequential(nn.Linear(6, 12), nn.RMSNorm(12), nn.Linear(12, 3)))
    analysis = find_channel_groups(dagprune.build_from_unstructured_module(model), (4, 6))
    assert [(g.name, g.size, g.prunable) for g in analysis.groups] == [("0", 12, True), ("2", 3, False)]


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_residual_stream_normalised_by_rms_norm_is_prunable_and_removal_is_exact(functional):
    torch.manual_seed(0)
    model = _randomize(_ResidualStream(functional))
    dag = dagprune.build_from_unstructured_module(model)
    x = torch.randn(2, 7, 8)
    with torch.no_grad():
        assert dagprune.max_relative_difference(model(x), dag(x)) <= 1e-5
    config = ChannelPruning(model=dag, input_shape_without_batch=(7, 8), pruning_proportion=0.5,
                            num_training_steps=1)
    gated = config.prepare_for_pruning().eval()
    residual = [g for g in config.prunable_groups if g.size == 16]
    assert len(residual) == 1, "the residual stream (embed, every block's down, the norms) is one group"
    for _ in random_gate_states(config, seed=1):
        slim = assert_removal_matches_gates(config, gated, (x,))
        kept = next(v.module.out_features for v in slim.inner_vertices if v.qualified_name == "embed")
        norms = [m for m in slim.modules() if isinstance(m, nn.RMSNorm)]
        assert len(norms) == (1 if functional else 3)
        assert all(n.normalized_shape == (kept,) and n.weight.shape == (kept,) for n in norms)


def test_masked_rms_norm_gradient_reaches_every_gate():
    model = _randomize(_ResidualStream())
    dag = dagprune.build_from_unstructured_module(model)
    config = ChannelPruning(model=dag, input_shape_without_batch=(7, 8), pruning_proportion=0.5,
                            num_training_steps=1)
    gated = config.prepare_for_pruning().train()
    gated(torch.randn(2, 7, 8)).square().sum().backward()
    assert all(gate.logits.grad is not None and gate.logits.grad.abs().sum() > 0 for gate in config.gates)
