"""Grouped layers (group norms, grouped convolutions) choose how their groups shrink by what
the rest of the model ties.

A grouped convolution removes whole conv groups; a group norm with the same groups after (or
before) it used to tie each channel position across its groups as well, which with the conv's
ties left a single class (nothing prunable: timm's efficientnet_b0_g8_gn). Now the norm keeps
the same positions per group only where the rest of the model does not already keep its
groups whole; otherwise removal drops whole groups and the norm's number of groups shrinks.

Conversely, a grouped convolution whose groups the model splits apart and sums (ResNeSt's split
attention reshapes its output to ``(radix, C)``) keeps the same positions in every group, and
its groups stay.

Where the model ties neither way, the finer choice is made: a group norm with more groups than
channels in each removes whole groups, a grouped convolution with more channels in each group
than groups keeps the same positions in every group.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import dagprune
from dagprune.ops import EvoNorm2d, FunctionalOp
from dagprune.ops.specs.normalization import kept_groups
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups
from gate_states import assert_removal_matches_gates, random_gate_states
from informative_weights import make_weights_informative

SHAPE = (3, 6, 6)


class _GroupedBlock(nn.Module):
    """1x1 conv, a group norm of 4 groups, a grouped 3x3 conv of the same 4 groups, a norm
    (``norm``), then a 1x1 conv; the norms' groups match the conv's."""

    def __init__(self, norm: str = "module"):
        super().__init__()
        self.expand = nn.Conv2d(3, 16, 1)
        self.norm1 = nn.GroupNorm(4, 16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.norm2 = {"module": nn.GroupNorm(4, 16), "evo": EvoNorm2d(16, "S0", groups=4),
                      "functional": None}[norm]
        self.norm2_weight = nn.Parameter(torch.rand(16) + 0.5) if norm == "functional" else None
        self.project = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = F.silu(self.norm1(self.expand(x)))
        x = self.grouped(x)
        x = F.group_norm(x, 4, self.norm2_weight) if self.norm2 is None else self.norm2(x)
        return self.project(F.silu(x))


class _PerChannelGroups(nn.Module):
    """GroupNorm with one channel per group (instance norm with an affine): each channel is its
    own group."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(8, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).relu())


def _prepared(model: nn.Module):
    torch.manual_seed(0)
    dag = dagprune.build_from_unstructured_module(make_weights_informative(model).eval())
    pruning = ChannelPruning(dag, SHAPE, 0.5, 10)
    return pruning, pruning.prepare_for_pruning()


@pytest.mark.parametrize("norm", ["module", "evo", "functional"])
def test_norm_groups_matching_conv_groups_are_removed_whole(norm):
    model = _GroupedBlock(norm)
    analysis = find_channel_groups(dagprune.build_from_unstructured_module(model.eval()), SHAPE)
    prunable = [g for g in analysis.groups if g.prunable]
    assert [len(g.classes) for g in prunable] == [4]  # the conv's four groups, each whole
    pruning, gated = _prepared(model)
    x = torch.randn(2, *SHAPE)
    group_counts = set()
    for _ in random_gate_states(pruning, seed=1, count=4):
        slim = assert_removal_matches_gates(pruning, gated, (x,))
        norms = [m for m in slim.modules() if isinstance(m, (nn.GroupNorm, EvoNorm2d))]
        group_counts.update(getattr(m, "num_groups", getattr(m, "groups", None)) for m in norms)
    assert group_counts - {4}, "some state removed whole groups"


def test_one_channel_per_group_is_prunable_channel_by_channel():
    pruning, gated = _prepared(_PerChannelGroups())
    assert len(pruning.analysis.groups[0].classes) == 8
    x = torch.randn(2, *SHAPE)
    for _ in random_gate_states(pruning, seed=2):
        slim = assert_removal_matches_gates(pruning, gated, (x,))
        norm = next(m for m in slim.modules() if isinstance(m, nn.GroupNorm))
        assert norm.num_groups == norm.num_channels


def test_unaligned_group_norm_keeps_the_same_positions_in_every_group():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    analysis = find_channel_groups(dagprune.build_from_unstructured_module(model.eval()), SHAPE)
    assert sorted(len(g.classes) for g in analysis.groups if g.prunable) == [4]  # 4 positions per group


class _ManySmallGroups(nn.Module):
    """Group norms with more groups than channels in each (groups of two channels), as a module
    and as ``F.group_norm``: removing whole groups keeps eight choices where keeping the same
    positions in every group would leave two."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(8, 16)
        self.mid = nn.Conv2d(16, 12, 1)
        self.scale, self.shift = nn.Parameter(torch.rand(12) + 0.5), nn.Parameter(torch.randn(12))
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = self.mid(self.norm(self.conv(x)).relu())
        return self.head(F.group_norm(x, 6, self.scale, self.shift).relu())


def test_more_groups_than_channels_per_group_removes_whole_groups():
    pruning, gated = _prepared(_ManySmallGroups())
    assert sorted(len(g.classes) for g in pruning.analysis.groups if g.prunable) == [6, 8]
    assert pruning.max_removable_proportion > 0.8
    x = torch.randn(2, *SHAPE)
    group_counts = set()
    for _ in random_gate_states(pruning, seed=5, count=4):
        slim = assert_removal_matches_gates(pruning, gated, (x,))
        group_counts.update(m.num_groups for m in slim.modules() if isinstance(m, nn.GroupNorm))
        functional = [op for op in slim.modules() if isinstance(op, FunctionalOp) and "group_norm" in op.function_name]
        assert len(functional) == 1
        group_counts.update(op.argument(1, "num_groups") for op in functional)
    assert group_counts - {8, 6} and group_counts & {1, 2, 3, 4, 5}, "some states removed whole groups"


class _FewLargeGroups(nn.Module):
    """A convolution of 2 groups with 8 input and 12 output channels in each (cpubone's spatial
    convs are 2 groups of 64 and 256): keeping the same positions in every group leaves 8 and
    12 choices where whole groups would leave 2."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.grouped = nn.Conv2d(16, 24, 3, padding=1, groups=2)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.grouped(F.relu(self.stem(x)))))


def test_few_groups_with_many_channels_keep_the_same_positions_in_every_group():
    pruning, gated = _prepared(_FewLargeGroups())
    assert sorted(len(g.classes) for g in pruning.analysis.groups if g.prunable) == [8, 12]
    x = torch.randn(2, *SHAPE)
    for _ in random_gate_states(pruning, seed=6, count=4):
        slim = assert_removal_matches_gates(pruning, gated, (x,))
        grouped = next(m for m in slim.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
        assert grouped.groups == 2


def test_kept_groups():
    assert kept_groups(None, 4) == 4
    assert kept_groups([1, 0, 1, 0, 1, 0], 3) == 3  # the same positions in every group
    assert kept_groups([1, 1, 0, 0, 1, 1], 3) == 2  # whole groups
    with pytest.raises(ValueError, match="keeps"):
        kept_groups([1, 1, 0, 1, 0, 0], 2)


class _SplitAttention(nn.Module):
    """ResNeSt's split attention, reduced: a conv of ``radix`` groups whose output is reshaped to
    ``(radix, C)`` (``C`` read from its shape) and summed over the radix axis."""

    def __init__(self, radix: int = 2):
        super().__init__()
        self.radix = radix
        self.stem = nn.Conv2d(3, 8, 1)
        self.split = nn.Conv2d(8, 12, 3, padding=1, groups=radix)
        self.head = nn.Conv2d(12 // radix, 4, 1)

    def forward(self, x):
        x = self.split(F.relu(self.stem(x)))
        batch, channels, height, width = x.shape
        x = x.reshape(batch, self.radix, channels // self.radix, height, width).sum(1)
        return self.head(F.relu(x))


def test_grouped_conv_split_apart_keeps_the_same_positions_in_every_group():
    pruning, gated = _prepared(_SplitAttention())
    assert sorted(len(g.classes) for g in pruning.analysis.groups if g.prunable) == [4, 6]  # stem, split
    x = torch.randn(2, *SHAPE)
    for _ in random_gate_states(pruning, seed=3, count=4):
        slim = assert_removal_matches_gates(pruning, gated, (x,))
        split = next(m for m in slim.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
        assert split.groups == 2


def test_resnest_split_attention_is_prunable():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = make_weights_informative(timm.create_model("resnest14d", pretrained=False)).eval()
    dag = dagprune.build_from_unstructured_module(model)
    pruning = ChannelPruning(dag, (3, 32, 32), 0.5, 10)
    gated = pruning.prepare_for_pruning()
    assert pruning.max_removable_proportion > 0.9  # 0.46 with whole conv groups (resnest26d)
    x = torch.randn(2, 3, 32, 32)
    for _ in random_gate_states(pruning, seed=4, count=2):
        assert_removal_matches_gates(pruning, gated, (x,))


class _ShuffledGroups(nn.Module):
    """ShuffleNet's unit with torch's ``nn.ChannelShuffle`` layer between grouped convolutions."""

    def __init__(self):
        super().__init__()
        self.expand, self.shuffle = nn.Conv2d(3, 12, 1), nn.ChannelShuffle(2)
        self.grouped, self.head = nn.Conv2d(12, 8, 3, padding=1, groups=2), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.shuffle(self.grouped(self.shuffle(self.expand(x)))))


def test_torch_channel_shuffle_layer_is_followed_and_removes_exactly(tmp_path):
    torch.manual_seed(0)
    model, x = _ShuffledGroups().eval(), torch.randn(2, 3, 6, 6)
    dag = dagprune.build_from_unstructured_module(model)
    assert torch.equal(model(x), dag(x))
    dag.save(tmp_path / "dag")
    assert torch.equal(dagprune.load_dag(tmp_path / "dag")(x), dag(x))
    pruning = ChannelPruning(dag, (3, 6, 6), 0.5, 10)
    gated = pruning.prepare_for_pruning()
    assert pruning.prunable_proportion == pytest.approx(1.0)
    for _ in random_gate_states(pruning, seed=5, count=2):
        assert_removal_matches_gates(pruning, gated, (x,))
