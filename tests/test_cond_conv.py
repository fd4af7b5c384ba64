"""CondConv2d (a mixture of expert kernels per sample): timm's layer rewritten into it computes
the same, its channels are followed on both sides and removed exactly; its routing weights are
not channels."""

import pytest
import torch
from torch import nn

import dagprune
from dagprune.ops import CondConv2d
from dagprune.ops.specs.cond_conv import _Routed
from dagprune_algorithms.pruning import ChannelPruning
from dagprune_algorithms.pruning.channel_groups import find_channel_groups

from gate_states import assert_removal_matches_gates, random_gate_states
from informative_weights import make_weights_informative


def _prepared(model: nn.Module, input_shape) -> tuple[ChannelPruning, dagprune.DagModule]:
    pruning = ChannelPruning(dagprune.build_from_unstructured_module(model.eval()), input_shape, 0.5, 10)
    return pruning, pruning.prepare_for_pruning()


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_cond_conv_channels_are_removed_exactly(groups, seed):
    pruning, gated = _prepared(make_weights_informative(_Routed(groups), seed), (3, 6, 6))
    for _ in random_gate_states(pruning, seed):
        assert_removal_matches_gates(pruning, gated, (torch.randn(3, 3, 6, 6),))
    names = {group.name for group in pruning.prunable_groups}
    assert "route" not in names  # the routing weights (one per expert) stay whole
    assert {"stem", "cond"} <= names if groups == 1 else "stem" in names


def test_routing_weights_are_a_barrier():
    dag = dagprune.build_from_unstructured_module(_Routed().eval())
    route = next(g for g in find_channel_groups(dag, (3, 6, 6)).groups if g.name == "route")
    assert not route.prunable and "routing weights" in route.reason


@pytest.mark.parametrize("padding", ["", "same"])
def test_timm_cond_conv_is_rewritten_into_the_same_computation(padding):
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    layer = timm_layers.CondConv2d(8, 6, 3, stride=2, padding=padding, num_experts=3, bias=True).eval()
    nn.init.normal_(layer.bias)

    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.route, self.cond = nn.Linear(8, 3), layer

        def forward(self, x):
            return self.cond(x, torch.sigmoid(self.route(x.mean((2, 3)))))

    model = Routed().eval()
    dag = dagprune.build_from_unstructured_module(model)
    assert any(isinstance(v.module, CondConv2d) for v in dag.inner_vertices)
    for size in (7, 8):  # SAME padding depends on the size
        x = torch.randn(3, 8, size, size)
        assert torch.equal(dag(x), model(x))


def test_efficientnet_condconv_is_meaningfully_prunable_and_saves(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = make_weights_informative(timm.create_model("efficientnet_cc_b0_4e", pretrained=False))
    pruning, gated = _prepared(model, (3, 64, 64))
    assert pruning.max_removable_proportion > 0.9
    x = torch.randn(2, 3, 64, 64)
    for _ in random_gate_states(pruning, 0, count=1):
        slim = assert_removal_matches_gates(pruning, gated, (x,))
    loaded = dagprune.load_dag(dagprune.save_dag(slim, tmp_path / "slim")).eval()
    with torch.no_grad():
        assert torch.equal(slim(x), loaded(x))
