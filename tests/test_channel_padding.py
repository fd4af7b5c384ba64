"""Zero-padded channels: the option-A shortcut of CIFAR ResNets (ResNet-20/56, the usual
benchmark of channel pruning papers) subsamples the input and pads it with zero channels to the
block's width. The padded channels are removable like the block's own; other paddings of a
channel axis copy or crop channels and are barred."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dagprune
from gate_states import assert_removal_matches_gates, random_gate_states, slim_models_matching_gates
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups


class _Block(nn.Module):
    def __init__(self, width: int, stride: int):
        super().__init__()
        out = width * stride
        self.conv1, self.bn1 = nn.Conv2d(width, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out)
        self.conv2, self.bn2 = nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out)
        self.pad = (out - width) // 2

    def forward(self, x):
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)) if self.pad else x
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + shortcut)


class _CifarResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(_Block(8, 1), _Block(8, 2), _Block(16, 1), _Block(16, 2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_option_a_shortcuts_keep_every_stage_prunable_and_remove_exactly(tmp_path):
    # the padded shortcut barred the stage before it and the block it joins (0.80 prunable)
    torch.manual_seed(0)
    model = _CifarResNet().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.running_var, 0.5, 1.5), nn.init.normal_(module.running_mean)
    example = torch.randn(2, 3, 16, 16)
    dag = dagprune.build_from_unstructured_module(model)
    groups = find_channel_groups(dag, (3, 16, 16)).groups
    assert [g.name for g in groups if not g.prunable] == ["fc"]
    pruning = ChannelPruning(dag, (3, 16, 16), 0.5, 10)
    gated = pruning.prepare_for_pruning()
    assert pruning.prunable_proportion == pytest.approx(1.0)
    for _ in random_gate_states(pruning, seed=0, count=3):
        slim = assert_removal_matches_gates(pruning, gated, (example,))
        loaded = dagprune.load_dag(slim.save(tmp_path / "slim"))
        assert torch.equal(loaded(example), slim(example))


@pytest.mark.parametrize("pad", [(0, 0, 0, 0, 1, 1), (0, 0, 0, 0, -1, 0)], ids=["reflect", "crop"])
def test_reflected_or_cropped_channels_are_barred(pad):
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 6, 1), nn.Conv2d(6 + sum(pad), 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.head(F.pad(y, pad, mode="reflect") if pad[4] > 0 else F.pad(y, pad))

    dag = dagprune.build_from_unstructured_module(Padded().eval())
    conv = find_channel_groups(dag, (3, 4, 4)).groups[0]
    assert conv.name == "conv" and not conv.prunable and "channel axis" in conv.reason


def test_padding_computed_at_run_time_passes_channels_on_other_axes_and_bars_its_own():
    # LongT5 pads its blocks by a length read at run time: its removal read that hole as a tuple
    class BlockPadded(nn.Module):
        def __init__(self, channels_too: bool):
            super().__init__()
            self.channels_too, self.up, self.head = channels_too, nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.up(x)
            pads = [(0, 0)] * h.ndim  # LongT5's form: the pad tuple is summed at run time
            pads[-1 if self.channels_too else 1] = (0, (-h.shape[1]) % 4 + 1)
            padded = F.pad(h, sum(pads[::-1], ()))
            return self.head(padded[..., :6]) if self.channels_too else self.head(padded)

    torch.manual_seed(0)
    x, other = (torch.randn(2, 5, 4),), (torch.randn(3, 7, 4),)
    dag = dagprune.build_from_unstructured_module(BlockPadded(False).eval(), example_inputs=x)
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=x)
    gated = pruning.prepare_for_pruning()
    slim_models_matching_gates(pruning, gated, x, [other], count=2)
    dag = dagprune.build_from_unstructured_module(BlockPadded(True).eval(), example_inputs=x)
    up = find_channel_groups(dag, example_inputs=x).groups[0]
    assert up.name == "up" and not up.prunable
