"""Regressions found by the timm coverage sweep: each case once removed channels inexactly."""

import pytest
import torch
from torch import nn

import dagprune
from dagprune_algorithms.pruning import ChannelPruning


def _removal_difference(model: nn.Module, input_shape, seed: int = 0, target: float = 0.9) -> float:
    torch.manual_seed(seed)
    dag = dagprune.build_from_unstructured_module(model.eval())
    pruning = ChannelPruning(dag, input_shape, target, 10)
    gated = pruning.prepare_for_pruning().eval()
    for gate in pruning.gates:
        gate.logits.data = torch.randn_like(gate.logits)
    slim = pruning.remove_channels().eval()
    x = torch.randn(2, *input_shape)
    with torch.no_grad():
        return dagprune.max_relative_difference(gated(x), slim(x))


class _SizeReadFromAnotherTensor(nn.Module):
    """Reshapes one branch with the channel count read from another tensor's shape."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        batch, channels, height, width = x.shape
        y = self.branch(x).flatten(2).transpose(1, 2)      # (B, HW, C) from another producer
        y = y.reshape(batch, height * width, channels)     # C read from x: couples the two
        return self.head(y.mean(1) + x.mean((2, 3)))


def test_size_read_from_a_channel_axis_couples_the_axes():
    assert _removal_difference(_SizeReadFromAnotherTensor(), (3, 6, 6)) <= 1e-4


def test_edgenext_reshape_with_run_time_channel_count():
    timm = pytest.importorskip("timm")
    model = timm.create_model("edgenext_xx_small", pretrained=False)
    assert _removal_difference(model, (3, 64, 64), target=0.5) <= 1e-4


def test_weight_standardised_convs_keep_their_inputs():
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = nn.Sequential(layers.ScaledStdConv2dSame(3, 8, 3, stride=2), nn.ReLU(),
                          layers.ScaledStdConv2dSame(8, 8, 3), nn.ReLU(),
                          layers.StdConv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    # Only the plain 1x1 conv stays prunable: every std-conv output feeds a std-conv input.
    assert _removal_difference(model, (3, 16, 16), target=0.97) <= 1e-4
