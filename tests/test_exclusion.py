"""Leaving layers alone (``exclude``), ``min_channels`` and ``round_to``, and the logit
distillation loss.

* Excluded modules keep the exact shapes of their weights after ``remove_channels()``, for any
  gate state, while removal stays exact (slim output == gated output) and the FLOPs of the
  slim model are those the gates predict.
* ``prunable_proportion`` falls by the FLOPs the excluded groups carry; their FLOPs count as
  fixed in the expected FLOPs.
* ``min_channels`` and ``round_to`` hold in the removed model for any gate state.
* The units tools (``ChannelMutator``, ``plan_iterative_pruning``) honour ``exclude`` the same way.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dagprune as dp
from dagprune.errors import PruningError
from dagprune_algorithms.pruning import ChannelMutator, ChannelPruning, logit_distillation_loss
from dagprune_algorithms.pruning.iterative import plan_iterative_pruning

from gate_states import assert_removal_matches_gates, random_gate_states
from zoo import ZOO, input_shapes, make_example_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

INPUT_SHAPE = (3, 8, 8)

EXCLUSIONS = {  # pattern -> modules whose weights must keep their shapes
    "stem*": ["stem.0", "stem.1"],
    "layer1.conv1": ["layer1.conv1"],
    "layer1": ["layer1.conv1", "layer1.bn1", "layer1.conv2", "layer1.bn2", "layer1.downsample.0"],
    "fc": ["fc"],
}
"""Patterns over ``ResNetBasicBlocks`` of the zoo (a stem, a projection block, an identity block)."""


class Widths(nn.Module):
    """Three convs with groups of 24, 20 and 6 channels, and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.body = nn.Conv2d(24, 20, 3, padding=1)
        self.neck = nn.Conv2d(20, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.neck(F.relu(self.body(F.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def _resnet_dag():
    entry = ZOO["resnet_basic_blocks"]
    return dp.build_from_unstructured_module(entry.factory().eval()), input_shapes(entry)[0], make_example_inputs(entry)


def _parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _weight_shapes(dag, modules):
    shapes = {}
    for vertex in dag.inner_vertices:
        if vertex.qualified_name in modules:
            shapes[vertex.qualified_name] = {name: tuple(t.shape) for name, t in vertex.module.state_dict().items()}
    return shapes


@pytest.mark.parametrize("pattern", sorted(EXCLUSIONS))
def test_excluded_modules_keep_their_weight_shapes_and_removal_stays_exact(pattern):
    dag, shape, inputs = _resnet_dag()
    modules = EXCLUSIONS[pattern]
    before = _weight_shapes(dag, modules)
    assert sorted(before) == sorted(modules)
    config = ChannelPruning(dag, shape, 0.999, 10, exclude=[pattern])
    gated = config.prepare_for_pruning()
    for _ in random_gate_states(config, seed=len(pattern), count=3):
        for gate in config.gates:  # close most channels: every group that can shrink does
            gate.logits.data -= 0.8
        slim = assert_removal_matches_gates(config, gated, inputs)
        assert _weight_shapes(slim, modules) == before
        assert _parameter_count(slim) < _parameter_count(dag)  # the other modules did shrink


def test_excluded_groups_have_no_gate_and_their_flops_count_as_fixed():
    dag, shape, _ = _resnet_dag()
    full = ChannelPruning(dag, shape, 0.999, 10)
    full.prepare_for_pruning()
    partial = ChannelPruning(dag, shape, 0.999, 10, exclude=["layer2*"])
    partial.prepare_for_pruning()
    excluded = [g for g in partial.channel_groups if g.reason.startswith("excluded:")]
    assert excluded and all(not g.prunable for g in excluded)
    assert "matches exclude pattern 'layer2*'" in excluded[0].reason
    assert len(partial.gates) == len(full.gates) - len(excluded)
    assert partial.prunable_proportion < full.prunable_proportion - 0.05
    assert partial.max_removable_proportion < full.max_removable_proportion
    for gate in partial.gates:  # everything prunable closed: the excluded FLOPs remain
        gate.logits.data.fill_(-5.0)
    assert partial.expected_proportion().item() >= 1 - partial.prunable_proportion - 1e-6


def test_a_pattern_matching_nothing_names_it_and_real_modules():
    dag, shape, _ = _resnet_dag()
    with pytest.raises(PruningError, match=r"exclude pattern 'layer9\*' matches no module .*'layer1'"):
        ChannelPruning(dag, shape, 0.5, 10, exclude=["layer9*"]).prepare_for_pruning()
    with pytest.raises(PruningError, match=r"write exclude=\['fc'\]"):
        ChannelPruning(dag, shape, 0.5, 10, exclude="fc")


@pytest.mark.parametrize("min_channels, round_to", [(5, 1), (1, 8), (3, 8), (10, 4)])
def test_min_channels_and_round_to_hold_in_the_removed_model(min_channels, round_to):
    torch.manual_seed(0)
    model = Widths().eval()
    dag = dp.build_from_unstructured_module(model)
    config = ChannelPruning(dag, INPUT_SHAPE, 0.999, 10, min_channels=min_channels, round_to=round_to)
    gated = config.prepare_for_pruning()
    inputs = (torch.randn(2, *INPUT_SHAPE),)
    for _ in random_gate_states(config, seed=min_channels + round_to, count=4):
        slim = assert_removal_matches_gates(config, gated, inputs)
        widths = {v.qualified_name: v.module.out_channels for v in slim.inner_vertices
                  if isinstance(v.module, nn.Conv2d)}
        for name, size in (("stem", 24), ("body", 20), ("neck", 6)):
            kept = widths[name]
            assert kept >= min(min_channels, size), (name, kept)
            if size >= round_to:
                assert kept % round_to == 0 or kept == size, (name, kept)


def test_groups_that_min_channels_keep_whole_get_no_gate():
    dag = dp.build_from_unstructured_module(Widths().eval())
    config = ChannelPruning(dag, INPUT_SHAPE, 0.999, 10, min_channels=8)
    config.prepare_for_pruning()
    assert [g.name for g in config.prunable_groups] == ["stem", "body"]
    assert "keep all 6 channels" in next(g.reason for g in config.channel_groups if g.name == "neck")


@pytest.mark.parametrize("arguments, message", [
    ({"min_channels": 0}, "min_channels must be a positive int"),
    ({"round_to": 2.5}, "round_to must be a positive int"),
    ({"round_to": 8, "block_size": 4}, "give one"),
])
def test_bad_channel_limits_are_refused(arguments, message):
    dag = dp.build_from_unstructured_module(Widths().eval())
    with pytest.raises(PruningError, match=message):
        ChannelPruning(dag, INPUT_SHAPE, 0.5, 10, **arguments)


def test_mutator_and_iterative_plan_honour_exclude():
    dag, shape, _ = _resnet_dag()
    parse = {"type": "ChannelAnalysis", "input_shape": list(shape)}
    everything = ChannelMutator(parse_cfg=parse)
    everything.prepare_from_supernet(dag)
    mutator = ChannelMutator(parse_cfg={**parse, "exclude": ["stem*"]})
    mutator.prepare_from_supernet(dag)
    left_alone = [unit for unit in mutator.units if unit.reason.startswith("excluded:")]
    assert left_alone and len(mutator.mutable_units) == len(everything.mutable_units) - len(left_alone)
    template = mutator.config_template(with_channels=True)
    assert template["parse_cfg"]["exclude"] == ["stem*"]
    rebuilt = ChannelMutator.from_config(template)  # parse mode 'Config': from the channel lists
    rebuilt.prepare_from_supernet(dag)
    assert [u.name for u in rebuilt.mutable_units] == [u.name for u in mutator.mutable_units]
    plan = plan_iterative_pruning(dag, shape, prune_times=1, step_epoch=1, target_pruning_ratio=0.5,
                                  exclude=["stem*"])
    assert set(plan.target_pruning_ratio) == {u.name for u in mutator.mutable_units}
    before = _weight_shapes(dag, ["stem.0"])
    algorithm = plan.create_algorithm()
    algorithm.maybe_prune(0)
    assert _weight_shapes(algorithm.remove_channels(), ["stem.0"]) == before


# ------------------------------------------------------------------------------- distillation
def test_logit_distillation_loss_matches_kl_and_is_finite():
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(6, 5)
    loss = logit_distillation_loss(student, teacher, 3.0)
    reference = F.kl_div(F.log_softmax(student / 3, -1), F.log_softmax(teacher / 3, -1),
                         reduction="batchmean", log_target=True) * 9
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    huge = logit_distillation_loss(torch.full((2, 5), 6e4, dtype=torch.float16),
                                   torch.tensor([[1e30, 0, -1e30, 0, -float("inf")]] * 2), 0.5)
    assert huge.dtype == torch.float32 and torch.isfinite(huge)
    assert logit_distillation_loss(teacher, teacher.clone(), 1.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature, shapes, message", [
    (0.0, ((2, 3), (2, 3)), "temperature must be a finite number > 0"),
    (float("nan"), ((2, 3), (2, 3)), "temperature must be a finite number > 0"),
    (2.0, ((2, 3), (2, 4)), "differ in shape"),
])
def test_logit_distillation_loss_refuses_bad_arguments(temperature, shapes, message):
    with pytest.raises(PruningError, match=message):
        logit_distillation_loss(torch.zeros(shapes[0]), torch.zeros(shapes[1]), temperature)
