"""timm's EvoNorm layers: rewritten into ``EvoNorm2d``, converted exactly in eval and train mode,
and prunable with exact removal (the S variants group-wise, like GroupNorm).

Traced, these layers kept their eval branch in train mode (the B variants' running variance)
and their group statistics read the channel count at run time (``C % groups``, ``C //
groups``), which left no prunable channel group in resnetv2_50d_evos and ese_vovnet39b_evos.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

import dagprune
from dagprune.ops import EvoNorm2d
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups
from gate_states import assert_removal_matches_gates, random_gate_states

timm = pytest.importorskip("timm")
evo_norm = importlib.import_module("timm.layers.evo_norm")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

VARIANTS = ("B0", "B1", "B2", "S0", "S0a", "S1", "S1a", "S2", "S2a")


def _informative(norm: nn.Module) -> nn.Module:
    """Parameters and statistics away from their identity initialisation."""
    with torch.no_grad():
        for tensor in [*norm.parameters(), *norm.buffers()]:
            tensor.uniform_(0.5, 1.5)
    return norm


def _evo_net(variant: str, apply_act: bool = True) -> nn.Module:
    groups = {} if variant.startswith("B") else {"group_size": 2}
    norm = getattr(evo_norm, "EvoNorm2d" + variant)(8, apply_act=apply_act, **groups)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _informative(norm), nn.Conv2d(8, 4, 1))


@pytest.mark.parametrize("apply_act", [True, False], ids=["act", "no-act"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_evo_norm_converts_exactly_in_eval_and_train_mode(variant, apply_act):
    torch.manual_seed(0)
    model = _evo_net(variant, apply_act).eval()
    dag = dagprune.build_from_unstructured_module(model)
    assert sum(isinstance(v.module, EvoNorm2d) for v in dag.inner_vertices) == 1
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(model(x), dag(x))
        model.train(), dag.train()
        assert torch.equal(model(x), dag(x))  # the B variants: batch statistics, running_var updated
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), dag.buffers()))


def _evo_stack() -> nn.Module:
    """S0 (groups of 2, as timm's resnetv2_50d_evos; more groups than channels in each, so whole
    groups are removed), a residual S0a (regnetz_*_evos), then B0."""

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _informative(evo_norm.EvoNorm2dS0(8, group_size=2)))
            self.body = nn.Sequential(nn.Conv2d(8, 12, 1), _informative(evo_norm.EvoNorm2dS2a(12, groups=3)),
                                      nn.Conv2d(12, 8, 3, padding=1), _informative(evo_norm.EvoNorm2dS0a(8, group_size=4)))
            self.head = nn.Sequential(nn.Conv2d(8, 6, 1), _informative(evo_norm.EvoNorm2dB0(6)), nn.Conv2d(6, 2, 1))

        def forward(self, x):
            x = self.stem(x)
            return self.head(x + self.body(x))

    return Stack()


def test_evo_norm_channels_are_prunable_and_removal_is_exact(tmp_path):
    torch.manual_seed(0)
    model = _evo_stack().eval()
    dag = dagprune.build_from_unstructured_module(model)
    inputs = (torch.randn(2, 3, 6, 6),)
    groups = {g.name: g for g in find_channel_groups(dag, (3, 6, 6)).groups}
    assert groups["stem.0"].prunable and groups["body.0"].prunable and groups["head.0"].prunable
    config = ChannelPruning(dag, (3, 6, 6), pruning_proportion=0.99, num_training_steps=1)
    gated = config.prepare_for_pruning().eval()
    stem_groups = set()
    for _ in random_gate_states(config, seed=0, count=4):
        slim = assert_removal_matches_gates(config, gated, inputs)
        norms = [v.module for v in slim.inner_vertices if isinstance(v.module, EvoNorm2d)]
        stem, *body = [n for n in norms if n.kind != "B0"]
        assert stem.num_features == 2 * stem.groups  # 4 groups of 2: whole groups go
        stem_groups.add(stem.groups)
        assert [n.groups for n in body] == [3, 2]  # fewer groups than channels in each: groups stay, each smaller
        loaded = dagprune.load_dag(slim.save(tmp_path / "slim"))
        with torch.no_grad():
            assert torch.equal(slim(*inputs), loaded(*inputs))
    assert stem_groups - {4}


def test_evo_norm_with_a_stateful_activation_stays_a_timm_leaf():
    norm = evo_norm.EvoNorm2dS1(8, groups=2, act_layer=nn.PReLU)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _informative(norm), nn.Conv2d(8, 2, 1)).eval()
    dag = dagprune.build_from_unstructured_module(copy.deepcopy(model))
    assert any(isinstance(v.module, evo_norm.EvoNorm2dS1) for v in dag.inner_vertices)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(model(x), dag(x))


def test_an_unknown_kind_is_a_dagprune_error_naming_the_kinds():
    from dagprune.errors import DagpruneError
    from dagprune.ops.evo_norm import EvoNorm2d
    with pytest.raises(DagpruneError, match=r"kind='S9'.*'S0'"):
        EvoNorm2d(8, kind="S9")
