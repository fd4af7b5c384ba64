"""Named channel units, templates and choices (mmrazor's ChannelMutator), and ``dagprune units``.

Pinned down here:

* names: timm's resnet34 gives exactly spec 000's ``target_pruning_ratio`` keys (without the
  mmcls ``backbone.`` prefix, in the same order), names are the same in another process;
* templates: the structure of spec 001, a JSON round trip, and parse mode "Config" rebuilding
  the same units from a template with channels without running the channel analysis;
* choices: ratio / number modes, rounding, divisor, minimum one channel, partial updates, and
  reading back what was achieved; importance criteria choose which channels stay ("taylor" by
  name: the current |weight x gradient|);
* errors: unknown names list the closest valid ones, out-of-range choices say the range;
* export: for sampled choices on every zoo model and on resnet34, the removed model equals
  the masked model (eval mode, <= 1e-4 relative) and has the FLOPs the units predict;
* the command: ``dagprune units`` flags and ``scripts/get_channel_units.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dagprune as dp
from dagprune.errors import PruningError
from dagprune_algorithms.pruning import mutator as mutator_module
from dagprune_algorithms.pruning import ChannelMutator, ChannelUnit, ChannelUnitError, SequentialChannelUnit
from dagprune_algorithms.pruning.importance import TaylorImportance
from dagprune_algorithms.app.units_command import UnitsUsageError, add_units_arguments, run_units

from zoo import ZOO, input_shapes, make_example_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------- named data
SPEC_000_RESNET34_UNITS = [
    "layer1.2.conv2_(0, 64)_64", "layer1.0.conv1_(0, 64)_64", "layer1.1.conv1_(0, 64)_64",
    "layer1.2.conv1_(0, 64)_64", "layer2.0.conv1_(0, 128)_128", "layer2.3.conv2_(0, 128)_128",
    "layer2.1.conv1_(0, 128)_128", "layer2.2.conv1_(0, 128)_128", "layer2.3.conv1_(0, 128)_128",
    "layer3.0.conv1_(0, 256)_256", "layer3.5.conv2_(0, 256)_256", "layer3.1.conv1_(0, 256)_256",
    "layer3.2.conv1_(0, 256)_256", "layer3.3.conv1_(0, 256)_256", "layer3.4.conv1_(0, 256)_256",
    "layer3.5.conv1_(0, 256)_256", "layer4.0.conv1_(0, 512)_512", "layer4.2.conv2_(0, 512)_512",
    "layer4.1.conv1_(0, 512)_512", "layer4.2.conv1_(0, 512)_512",
]
"""Spec 000's ``target_pruning_ratio`` keys for mmcls resnet34, ``backbone.`` removed, in order."""

RESNET34_NOT_MUTABLE = ["fc_(0, 1000)_1000"]
"""resnet34's units that cannot be pruned: the classifier's outputs are the model's output."""

RESNET34_INPUT = (3, 32, 32)
"""Small input for the resnet34 tests (the units do not depend on the spatial size)."""

REMOVAL_TOLERANCE = 1e-4
"""``max_relative_difference(masked(x), slim(x))`` bound (eval mode)."""

FLOPS_TOLERANCE = 1e-6
"""Bound for ``|count_flops(slim) / count_flops(original) - mutator.flops_proportion()|``."""

ZOO_SAMPLED_STATES = (1, 2)
"""Seeds of ``sample_choices`` checked on every zoo model (besides the smallest choices)."""


# ------------------------------------------------------------------------------- helpers
def zoo_shape(name: str):
    shapes = input_shapes(ZOO[name])
    return shapes[0] if len(shapes) == 1 else [list(s) for s in shapes]


def zoo_mutator(name: str, **unit_args) -> ChannelMutator:
    dag = dp.build_from_unstructured_module(ZOO[name].factory(seed=0).eval())
    mutator = ChannelMutator({"type": "L1ChannelUnit", "default_args": unit_args},
                             {"type": "ChannelAnalysis", "input_shape": zoo_shape(name)})
    mutator.prepare_from_supernet(dag)
    return mutator


def small_mutator(**unit_args) -> ChannelMutator:
    """conv(3->8) bn relu conv(8->16) relu pool linear(16->4); units '0_(0, 8)_8', '3_(0, 16)_16'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    mutator = ChannelMutator({"default_args": unit_args}, {"input_shape": [3, 12, 12]})
    mutator.prepare_from_supernet(dp.build_from_unstructured_module(model.eval()))
    return mutator


def empties_a_tensor(mutator: ChannelMutator) -> bool:
    keep = mutator.kept_classes()
    analysis = mutator.analysis
    return any(len(classes) and not keep[classes].any() for vertex in analysis.dag.inner_vertices
               for classes in mutator_module.iter_layout_atoms(analysis.layouts[vertex]))


def check_export(mutator: ChannelMutator, inputs) -> dp.DagModule:
    """The removed model equals the masked model and has the predicted FLOPs."""
    masked = mutator.masked_model.eval()
    slim = mutator.remove_channels().eval()
    slim.lint()
    assert not any(isinstance(m, ChannelUnit) for m in slim.modules())
    with torch.no_grad():
        difference = dp.max_relative_difference(masked(*inputs), slim(*inputs))
    assert difference <= REMOVAL_TOLERANCE, f"slim differs from masked by {difference:.3g}"
    shape = mutator.input_shape
    measured = dp.count_flops(slim, shape).total / dp.count_flops(mutator.dag, shape).total
    assert abs(measured - mutator.flops_proportion()) <= FLOPS_TOLERANCE
    for unit in mutator.mutable_units:  # every kept count is what the choice read back says
        assert unit.kept_channels == round(unit.current_choice * unit.num_channels
                                           if unit.choice_mode == "ratio" else unit.current_choice)
    return slim


@pytest.fixture(scope="module")
def resnet34_mutator() -> ChannelMutator:
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("resnet34", pretrained=False).eval()
    mutator = ChannelMutator({"type": "L1ChannelUnit", "default_args": {"choice_mode": "ratio"}},
                             {"type": "ChannelAnalysis", "input_shape": list(RESNET34_INPUT)})
    mutator.prepare_from_supernet(dp.build_from_unstructured_module(model))
    return mutator


# ------------------------------------------------------------------------------- names
def test_resnet34_units_are_spec_000_keys(resnet34_mutator):
    assert list(resnet34_mutator.choice_template()) == SPEC_000_RESNET34_UNITS
    assert [u.name for u in resnet34_mutator.units if not u.mutable] == RESNET34_NOT_MUTABLE
    assert len(resnet34_mutator.units) == len(SPEC_000_RESNET34_UNITS) + len(RESNET34_NOT_MUTABLE)
    (fc,) = [u for u in resnet34_mutator.units if not u.mutable]
    assert "output" in fc.reason
    residual = resnet34_mutator.unit("layer1.2.conv2_(0, 64)_64")  # named after its last producer
    assert [e["name"] for e in residual.output_related] == [
        "conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]


def test_torchvision_resnet34_gives_the_same_units():
    torchvision = pytest.importorskip("torchvision")
    with torch.random.fork_rng(devices=[]):
        model = torchvision.models.resnet34().eval()
    mutator = ChannelMutator({"type": "SequentialMutableChannelUnit"}, {"input_shape": list(RESNET34_INPUT)})
    mutator.prepare_from_supernet(dp.build_from_unstructured_module(model))
    assert list(mutator.choice_template()) == SPEC_000_RESNET34_UNITS
    assert [u.name for u in mutator.units if not u.mutable] == RESNET34_NOT_MUTABLE


def test_spec_000_config_with_the_backbone_prefix_is_refused_with_a_hint(resnet34_mutator):
    with pytest.raises(ChannelUnitError) as raised:
        resnet34_mutator.set_choices({"backbone.layer1.0.conv1_(0, 64)_64": 0.7})
    assert "'layer1.0.conv1_(0, 64)_64'" in str(raised.value)
    assert "no mmrazor 'backbone.' prefix" in str(raised.value)


def test_unit_name_has_the_producer_range_and_the_width():
    names = [u.name for u in zoo_mutator("attention_block").units]
    # qkv: 96 output positions, 8 channel decisions (the head dims of q and k, tied over heads)
    assert names == ["block.attn.qkv_(0, 96)_8", "block.attn.proj_(0, 32)_32", "block.mlp.fc1_(0, 64)_64",
                     "block.mlp.fc2_(0, 32)_32", "head_(0, 10)_10"]
    assert [u.mutable for u in zoo_mutator("attention_block").units] == [True, False, True, False, False]


def test_names_are_the_same_in_another_process():
    script = ("import sys; sys.path.insert(0, 'tests'); import dagprune as dp; "
              "from dagprune_algorithms.pruning import ChannelMutator; from zoo import ZOO\n"
              "for name in ('squeeze_excite', 'shufflenetv2_split_shuffle'):\n"
              "    m = ChannelMutator(parse_cfg={'input_shape': [3, 16, 16]})\n"
              "    m.prepare_from_supernet(dp.build_from_unstructured_module(ZOO[name].factory(seed=0)))\n"
              "    print([u.name for u in m.units])")
    environment = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    output = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=environment,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    here = [str([u.name for u in zoo_mutator(name).units])
            for name in ("squeeze_excite", "shufflenetv2_split_shuffle")]
    assert output == here


# ------------------------------------------------------------------------------- templates
def test_config_template_has_spec_001_structure():
    mutator = small_mutator(choice_mode="ratio")
    config = mutator.config_template()
    assert config == {
        "type": "ChannelMutator",
        "channel_unit_cfg": {"type": "L1ChannelUnit", "default_args": {"choice_mode": "ratio"},
                             "units": {"0_(0, 8)_8": {"choice": 1.0}, "3_(0, 16)_16": {"choice": 1.0},
                                       "7_(0, 4)_4": {"mutable": False, "choice": 1.0,
                                                      "reason": mutator.unit("7_(0, 4)_4").reason}}},
        "parse_cfg": {"type": "ChannelAnalysis", "input_shape": [3, 12, 12]}}
    only = mutator.config_template(only_mutable_units=True, with_unit_init_args=True)
    assert list(only["channel_unit_cfg"]["units"]) == ["0_(0, 8)_8", "3_(0, 16)_16"]
    assert only["channel_unit_cfg"]["units"]["0_(0, 8)_8"]["init_args"] == {
        "num_channels": 8, "choice_mode": "ratio", "divisor": 1, "min_value": 1, "importance": "l1"}
    channels = mutator.config_template(with_channels=True)
    assert channels["parse_cfg"]["type"] == "Config"  # usable as it is, without analysing again
    assert channels["channel_unit_cfg"]["units"]["0_(0, 8)_8"]["channels"] == {
        "output_related": [{"name": "0", "vertex": "_0", "axis": 1, "size": 8, "channels": [[0, 8, 0, 1]]}],
        "input_related": [{"name": "3", "vertex": "_3", "input_index": 0, "axis": 1, "size": 8,
                           "kind": "mask", "channels": [[0, 8, 0, 1]]}]}


@pytest.mark.parametrize("name", ["resnet_basic_blocks", "attention_block", "resnext_grouped"])
def test_template_round_trips_through_json(name):
    mutator = zoo_mutator(name, choice_mode="number", divisor=2)
    mutator.set_choices(mutator.sample_choices(seed=3))
    for flags in [(False, False, False), (False, True, False), (True, True, False), (False, True, True)]:
        config = mutator.config_template(*flags)
        rebuilt = ChannelMutator.from_config(json.loads(json.dumps(config)))
        rebuilt.prepare_from_supernet(mutator.dag)
        assert rebuilt.config_template(*flags) == config
        assert rebuilt.current_choices == mutator.current_choices


@pytest.mark.parametrize("name", ["resnet_basic_blocks", "densenet_concat", "tiny_vit", "groupnorm"])
def test_config_parse_mode_rebuilds_the_units_without_analysing_the_model(name, monkeypatch):
    traced = zoo_mutator(name)
    traced.set_choices(traced.sample_choices(seed=5))
    template = json.loads(json.dumps(traced.config_template(with_unit_init_args=True, with_channels=True)))
    fresh = dp.build_from_unstructured_module(ZOO[name].factory(seed=0).eval())

    def no_analysis(*args, **kwargs):
        raise AssertionError("parse mode 'Config' ran the channel analysis")

    with monkeypatch.context() as patch:
        patch.setattr(mutator_module, "find_channel_groups", no_analysis)
        rebuilt = ChannelMutator.from_config(template)
        rebuilt.prepare_from_supernet(fresh)
        assert [u.name for u in rebuilt.units] == [u.name for u in traced.units]
        assert rebuilt.current_choices == traced.current_choices
        for old, new in zip(traced.units, rebuilt.units):
            assert torch.equal(old.mask, new.mask)  # same weights, same L1 ranking
        inputs = make_example_inputs(ZOO[name], batch_size=2)
        with torch.no_grad():
            expected = traced.masked_model.eval()(*inputs)
            assert dp.max_relative_difference(expected, rebuilt.masked_model.eval()(*inputs)) == 0
    if not empties_a_tensor(rebuilt):  # export analyses the model once and checks the template
        check_export(rebuilt, inputs)


def test_config_parse_mode_refuses_a_template_of_another_model():
    template = zoo_mutator("plain_mean_pool").config_template(with_channels=True)
    other = dp.build_from_unstructured_module(ZOO["plain_flatten"].factory(seed=0))
    with pytest.raises(ChannelUnitError, match="another model"):
        ChannelMutator.from_config(template).prepare_from_supernet(other)
    without_channels = zoo_mutator("plain_mean_pool").config_template()
    without_channels["parse_cfg"]["type"] = "Config"
    with pytest.raises(ChannelUnitError, match="has no 'channels'"):
        ChannelMutator.from_config(without_channels).prepare_from_supernet(other)


def test_a_traced_config_naming_units_of_another_model_is_refused():
    template = zoo_mutator("plain_mean_pool").config_template()
    with pytest.raises(ChannelUnitError, match="closest"):
        ChannelMutator.from_config(template).prepare_from_supernet(
            dp.build_from_unstructured_module(ZOO["plain_flatten"].factory(seed=0)))


# ------------------------------------------------------------------------------- choices
def test_ratio_choices_round_to_channels_and_read_back_what_was_kept():
    mutator = small_mutator()
    mutator.set_choices({"3_(0, 16)_16": 0.7})  # 11.2 channels -> 11
    assert mutator.current_choices == {"0_(0, 8)_8": 1.0, "3_(0, 16)_16": 11 / 16}
    mutator.set_choices({"0_(0, 8)_8": 0.5625})  # 4.5 -> 5 (halves round up); the other unit stays
    assert mutator.current_choices == {"0_(0, 8)_8": 5 / 8, "3_(0, 16)_16": 11 / 16}
    mutator.set_choices({"0_(0, 8)_8": 0.01})  # at least one channel
    assert mutator.unit("0_(0, 8)_8").kept_channels == 1
    mutator.set_choices({"0_(0, 8)_8": 1})
    assert mutator.unit("0_(0, 8)_8").kept_channels == 8


def test_number_choices_divisor_and_min_value():
    mutator = small_mutator(choice_mode="number", divisor=4, min_value=6)
    mutator.set_choices({"3_(0, 16)_16": 10})  # nearest multiple of 4 (ties up): 12
    assert mutator.current_choices["3_(0, 16)_16"] == 12
    mutator.set_choices({"3_(0, 16)_16": 1})  # at least min_value, as a multiple of 4: 8
    assert mutator.current_choices["3_(0, 16)_16"] == 8
    mutator.set_choices({"0_(0, 8)_8": 7})  # 8 = the full width
    assert mutator.current_choices["0_(0, 8)_8"] == 8
    assert mutator.unit("3_(0, 16)_16").allowed_counts() == [8, 12, 16]
    assert mutator.unit("0_(0, 8)_8").allowed_counts() == [8]


def test_sampled_choices_are_achievable_in_range_and_reproducible():
    mutator = zoo_mutator("densenet_concat", divisor=2)
    first = mutator.sample_choices(seed=7)
    assert first == mutator.sample_choices(seed=7)
    assert first.keys() == mutator.choice_template().keys()
    mutator.set_choices(first)
    assert mutator.current_choices == first
    for name, choice in first.items():
        unit = mutator.unit(name)
        assert 0 < choice <= 1 and round(choice * unit.num_channels) in unit.allowed_counts()


def test_choices_are_validated_before_any_unit_changes():
    mutator = small_mutator()
    with pytest.raises(ChannelUnitError):
        mutator.set_choices({"0_(0, 8)_8": 0.5, "3_(0, 16)_16": 2.0})
    assert mutator.current_choices == {"0_(0, 8)_8": 1.0, "3_(0, 16)_16": 1.0}


def test_a_unit_that_cannot_be_pruned_only_takes_its_full_choice():
    mutator = small_mutator()
    mutator.set_choices({"7_(0, 4)_4": 1.0})
    with pytest.raises(ChannelUnitError, match="cannot be pruned.*reaches the model output"):
        mutator.set_choices({"7_(0, 4)_4": 0.5})
    assert "7_(0, 4)_4" not in mutator.current_choices


# ------------------------------------------------------------------------------- importance
def test_l1_keeps_the_filters_with_the_largest_weights():
    mutator = small_mutator()
    conv = mutator.dag.vertex("_3").module
    with torch.no_grad():
        conv.weight.copy_(torch.arange(16, dtype=torch.float32).flip(0).view(16, 1, 1, 1) + 1)
        conv.weight[5] *= 100
    mutator.set_choices({"3_(0, 16)_16": 0.25})
    assert np.flatnonzero(mutator.unit("3_(0, 16)_16").mask.numpy()).tolist() == [0, 1, 2, 5]


def test_bn_scale_keeps_the_channels_with_the_largest_norm_scale():
    mutator = small_mutator(importance="bn_scale")
    with torch.no_grad():
        mutator.dag.vertex("_1").module.weight.copy_(torch.tensor([0.1, -3, 0.2, 2, 0.3, 0.4, 0.5, 0.6]))
    mutator.set_choices({"0_(0, 8)_8": 0.25})
    assert np.flatnonzero(mutator.unit("0_(0, 8)_8").mask.numpy()).tolist() == [1, 3]


def test_sequential_units_keep_the_first_channels():
    mutator = ChannelMutator({"type": "SequentialMutableChannelUnit"}, {"input_shape": [3, 16, 16]})
    mutator.prepare_from_supernet(dp.build_from_unstructured_module(ZOO["plain_mean_pool"].factory(seed=0)))
    mutator.set_choices({"conv2_(0, 16)_16": 0.5})
    assert isinstance(mutator.unit("conv2_(0, 16)_16"), SequentialChannelUnit)
    assert mutator.unit("conv2_(0, 16)_16").mask.tolist() == [1.0] * 8 + [0.0] * 8
    assert "importance" not in mutator.config_template(with_unit_init_args=True)[
        "channel_unit_cfg"]["units"]["conv2_(0, 16)_16"]["init_args"]


def test_taylor_scores_from_data_choose_the_kept_channels():
    mutator = zoo_mutator("plain_mean_pool")
    name = "conv2_(0, 16)_16"
    taylor = TaylorImportance(mutator.analysis)
    with taylor:
        mutator.masked_model.train()
        mutator.masked_model(*make_example_inputs(ZOO["plain_mean_pool"], batch_size=4)).square().sum().backward()
    scores = taylor.importance(mutator.group_of(name))
    mutator.set_choices({name: 0.25}, scores={name: scores})
    kept = np.flatnonzero(mutator.unit(name).mask.numpy())
    assert sorted(kept.tolist()) == sorted(np.argsort(-scores, kind="stable")[:4].tolist())


def test_taylor_by_name_ranks_by_weight_times_the_gradient_now():
    mutator = small_mutator(importance="taylor")
    name = "3_(0, 16)_16"
    with pytest.raises(PruningError, match=r"has no gradient: run loss.backward\(\)"):
        mutator.set_choices({name: 0.25})
    conv = mutator.dag.vertex("_3").module
    with torch.no_grad():  # L1 would keep filters 12..15
        conv.weight.mul_(0.01).add_(torch.arange(16.0).view(16, 1, 1, 1))
    mutator.masked_model.train()
    inputs = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    mutator.masked_model(inputs).square().sum().backward()
    taylor = (conv.weight * conv.weight.grad).sum(dim=(1, 2, 3)).abs().detach()
    mutator.set_choices({name: 0.25})
    kept = np.flatnonzero(mutator.unit(name).mask.numpy()).tolist()
    assert kept == sorted(torch.argsort(taylor, descending=True)[:4].tolist())
    assert kept != [12, 13, 14, 15]


# ------------------------------------------------------------------------------- errors
def test_unknown_unit_names_list_the_closest():
    mutator = small_mutator()
    with pytest.raises(ChannelUnitError, match=r"unknown unit '3_\(0, 16\)_15'; closest: '3_\(0, 16\)_16'"):
        mutator.set_choices({"3_(0, 16)_15": 0.5})
    with pytest.raises(ChannelUnitError, match="closest"):
        mutator.unit("0_(0,8)_8")


@pytest.mark.parametrize("mode, choice, message", [
    ("ratio", 0.0, r"out of range: choice_mode 'ratio' .* in \(0, 1\]"),
    ("ratio", 1.5, r"out of range"), ("ratio", -0.2, "out of range"),
    ("ratio", float("nan"), "not a number"), ("ratio", True, "not a number"), ("ratio", "0.5", "not a number"),
    ("number", 0, r"an int in \[1, 16\]"), ("number", 17, r"an int in \[1, 16\]"),
    ("number", 2.5, "an int"),
])
def test_out_of_range_choices_say_the_range(mode, choice, message):
    mutator = small_mutator(choice_mode=mode)
    with pytest.raises(ChannelUnitError, match=message):
        mutator.set_choices({"3_(0, 16)_16": choice})


@pytest.mark.parametrize("unit_cfg, parse_cfg, message", [
    ({"type": "L1MutableChanelUnit"}, None, "closest: 'L1MutableChannelUnit'"),
    ({"default_args": {"choice_mod": "ratio"}}, None, "closest: 'choice_mode'"),
    ({"default_args": {"choice_mode": "ratios"}}, None, "closest: 'ratio'"),
    ({"default_args": {"importance": "l2"}}, None, "closest: 'l1'"),
    ({"default_args": {"divisor": 0}}, None, "divisor must be a positive int"),
    ({"unit": {}}, None, "closest: 'units'"),
    (None, {"type": "BackwardTracr"}, "closest: 'BackwardTracer'"),
    (None, {"type": "ChannelAnalysis", "loss_calculator": {}}, "unknown parse_cfg key"),
])
def test_bad_configs_name_the_closest_valid_names(unit_cfg, parse_cfg, message):
    with pytest.raises(ChannelUnitError, match=message):
        mutator = ChannelMutator(unit_cfg, parse_cfg)
        mutator.prepare_from_supernet(dp.build_from_unstructured_module(nn.Sequential(nn.Conv2d(3, 4, 1))))


def test_mmrazor_tracer_configs_are_accepted():
    parse = {"type": "BackwardTracer", "loss_calculator": {"type": "ImageClassifierPseudoLoss"},
             "input_shape": [3, 12, 12]}
    mutator = ChannelMutator({"type": "L1MutableChannelUnit", "default_args": {"choice_mode": "ratio"}}, parse)
    mutator.prepare_from_supernet(small_mutator().dag)
    assert list(mutator.choice_template()) == ["0_(0, 8)_8", "3_(0, 16)_16"]


def test_using_a_mutator_before_preparing_it_says_what_to_do():
    with pytest.raises(ChannelUnitError, match="prepare_from_supernet"):
        ChannelMutator().choice_template()


# ------------------------------------------------------------------------------- export
def test_all_full_choices_give_the_original_model():
    mutator = zoo_mutator("resnet_basic_blocks")
    inputs = make_example_inputs(ZOO["resnet_basic_blocks"])
    with torch.no_grad():
        assert dp.max_relative_difference(mutator.dag.eval()(*inputs), mutator.masked_model.eval()(*inputs)) == 0
    slim = check_export(mutator, inputs)
    assert sum(p.numel() for p in slim.parameters()) == sum(p.numel() for p in mutator.dag.parameters())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_removed_model_equals_the_masked_model_on_the_zoo(name):
    mutator = zoo_mutator(name)
    inputs = make_example_inputs(ZOO[name], batch_size=2)
    smallest = {unit.name: 1e-9 for unit in mutator.mutable_units}
    states = [smallest] + [mutator.sample_choices(seed) for seed in ZOO_SAMPLED_STATES]
    for choices in states:
        mutator.set_choices(choices)
        if empties_a_tensor(mutator):  # a unit split over tensors kept channels in one only
            with pytest.raises(ChannelUnitError, match="without channels"):
                mutator.remove_channels()
            continue
        check_export(mutator, inputs)


def test_pruning_only_the_residual_stream_of_a_vit_exports_exactly():
    """A regression: before 2cb5276 the slim model's ``reshape(B, N, C)`` after the attention
    kept the unpruned width (RuntimeError), also with ChannelPruning's gates."""
    mutator = zoo_mutator("tiny_vit")
    (residual,) = [u for u in mutator.mutable_units if "patch_embed" in [e["name"] for e in u.output_related]]
    mutator.set_choices({residual.name: 0.5})  # the residual stream only
    check_export(mutator, make_example_inputs(ZOO["tiny_vit"], batch_size=2))


def test_removed_resnet34_equals_the_masked_model(resnet34_mutator):
    resnet34_mutator.set_choices(resnet34_mutator.sample_choices(seed=0))
    inputs = (torch.randn(2, *RESNET34_INPUT, generator=torch.Generator().manual_seed(0)),)
    slim = check_export(resnet34_mutator, inputs)
    resnet34_mutator.set_choices({name: 1.0 for name in SPEC_000_RESNET34_UNITS})
    assert slim.vertex("layer1_0_conv1").module.out_channels < 64


# ------------------------------------------------------------------------------- command
def run_command(argv, capsys) -> str:
    parser = argparse.ArgumentParser(prog="dagprune units")
    add_units_arguments(parser)
    assert run_units(parser.parse_args(argv)) == 0
    return capsys.readouterr().out


def test_units_command_prints_the_templates_of_a_saved_dag(tmp_path, capsys):
    saved = dp.build_from_unstructured_module(ZOO["resnet_basic_blocks"].factory(seed=0)).save(tmp_path / "dag")
    size = ["--input-size", "3", "16", "16"]
    mutator = zoo_mutator("resnet_basic_blocks", choice_mode="ratio")
    assert json.loads(run_command([saved, *size], capsys)) == mutator.config_template()
    assert json.loads(run_command([saved, "-i", *size], capsys)) == mutator.config_template(with_unit_init_args=True)
    both = run_command([saved, "-c", "-i", *size, "-o", str(tmp_path / "units.json")], capsys)
    assert json.loads(both) == mutator.config_template(with_unit_init_args=True, with_channels=True)
    assert json.loads((tmp_path / "units.json").read_text()) == json.loads(both)
    assert json.loads(run_command([saved, "--choice", "-c", "-i", *size], capsys)) == mutator.choice_template()
    assert json.loads(run_command([saved, "--only-mutable", "--choice-mode", "number", *size], capsys)) == \
        zoo_mutator("resnet_basic_blocks", choice_mode="number").config_template(only_mutable_units=True)


def test_units_command_on_timm_resnet34_prints_spec_000_keys(capsys):
    pytest.importorskip("timm")
    printed = json.loads(run_command(["resnet34", "--choice", "--input-size", "3", "32", "32"], capsys))
    assert printed == {name: 1.0 for name in SPEC_000_RESNET34_UNITS}


def test_units_command_errors_name_the_closest_models():
    pytest.importorskip("timm")
    parser = argparse.ArgumentParser()
    add_units_arguments(parser)
    with pytest.raises(UnitsUsageError, match="neither a saved DAG directory nor a timm model.*resnet34"):
        run_units(parser.parse_args(["resnet3"]))
    with pytest.raises(UnitsUsageError, match="--input-size must be positive"):
        run_units(parser.parse_args(["resnet34", "--input-size", "3", "0", "32"]))


def test_get_channel_units_script_has_the_same_flags(tmp_path, capsys):
    saved = dp.build_from_unstructured_module(ZOO["plain_mean_pool"].factory(seed=0)).save(tmp_path / "dag")
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    script = str(REPO_ROOT / "scripts" / "get_channel_units.py")
    done = subprocess.run([sys.executable, script, saved, "--choice", "--input-size", "3", "16", "16",
                           "-o", str(tmp_path / "choice.json")], env=environment, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == zoo_mutator("plain_mean_pool").choice_template()
    assert json.loads((tmp_path / "choice.json").read_text()) == json.loads(done.stdout)
    module = runpy.run_path(script)  # the error path, in this process
    assert module["main"]([str(tmp_path / "missing")]) == 2
    assert "get_channel_units.py: error:" in capsys.readouterr().err
