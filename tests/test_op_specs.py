"""Every op has a spec, and every spec has every facet that applies to it.

The facets are checked by using them: each spec's example model is converted, its FLOPs
counted, its channel groups found, its gates set to a random state and its channels removed;
the slim model must compute what the gated model computes, with the FLOPs the gates predict.
A producer with weights must rank its channels (importance), a normalisation that consumes
channels must apply the mask itself (masking). The specs of the optional libraries' support
(timm's channels-last functions) are loaded first, so that they are checked too.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import dagprune
from dagprune.ops import OP_TYPES, OPS, FunctionalOp, OpRegistry, OpSpec, opaque_coupling
from dagprune.ops.spec import ChannelWeight

from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups
from gate_states import assert_removal_matches_gates, random_gate_states

try:
    import timm  # noqa: F401
except ImportError:  # the core specs are checked all the same
    pass
dagprune.integrations.load_support_for_imported_libraries()  # registers their specs in OPS

# torch.nn classes that never become an op of a traced model, one reason each.
NOT_OPS = {
    "Module": "the base class", "Container": "a container, traced through",
    "Sequential": "a container, traced through", "ModuleList": "a container, traced through",
    "ModuleDict": "a container, traced through", "ParameterList": "a container of parameters",
    "ParameterDict": "a container of parameters", "DataParallel": "a wrapper, not a layer",
}
LAZY_PREFIX = "Lazy"  # lazy layers become their plain class on their first call
LOSS_SUFFIXES = ("Loss", "Loss2d")  # losses are computed outside the model's forward

# Fallback specs: any module or function without a spec of its own lands here.
FALLBACKS = ("leaf_module", "function")
# Specs without an example: they are opaque (channels never cross them) or black boxes.
WITHOUT_EXAMPLE = {spec.name for spec in OPS if spec.is_opaque}


def _nn_layer_classes() -> list[type]:
    classes = []
    for name in sorted(dir(nn)):
        value = getattr(nn, name)
        if not (inspect.isclass(value) and issubclass(value, nn.Module)) or name in NOT_OPS:
            continue
        if name.startswith(LAZY_PREFIX) or name.endswith(LOSS_SUFFIXES):
            continue
        classes.append(value)
    return classes


@pytest.mark.parametrize("layer", _nn_layer_classes(), ids=lambda c: c.__name__)
def test_every_torch_nn_layer_has_a_spec_of_its_own(layer):
    spec = OPS.lookup_type(layer)
    assert spec.name not in FALLBACKS, (
        f"nn.{layer.__name__} falls back to the {spec.name!r} spec; give it a spec in "
        "dagprune/ops/specs/ (or list it among the black boxes in leaves.py)")


def test_every_op_family_and_its_functions_have_a_spec():
    for name, cls in OP_TYPES.items():
        spec = OPS.lookup_type(cls)
        assert cls is FunctionalOp or spec.name not in FALLBACKS, f"op type {name} has no spec"
        for function in getattr(cls, "function_names", ()):
            op = cls.__new__(cls)
            nn.Module.__init__(op)
            op.function_name = function
            assert OPS.lookup(op).name not in FALLBACKS, f"{function} ({name}) has no spec"


@pytest.mark.parametrize("spec", list(OPS), ids=lambda s: s.name)
def test_spec_declares_its_facets(spec):
    assert spec.missing_facets() == []
    assert spec.targets, f"{spec.name} describes no op"
    if spec.name not in WITHOUT_EXAMPLE:
        assert spec.example is not None, f"{spec.name} lets channels through but has no example"


def test_registry_refuses_a_spec_missing_a_facet_and_a_taken_target():
    registry = OpRegistry()
    passes = lambda ctx, vertex, module, layouts, values, output: layouts[0]  # noqa: E731
    with pytest.raises(ValueError, match="lacks the facets \\['removal'\\]"):
        registry.register(OpSpec("scale", (nn.Hardtanh,), flops=lambda m, i, o: 0, coupling=passes))
    registry.register(OpSpec("opaque", (nn.Hardtanh,), flops=lambda m, i, o: 0, coupling=opaque_coupling))
    with pytest.raises(ValueError, match="already have a spec"):
        registry.register(OpSpec("other", (nn.Hardtanh,), flops=lambda m, i, o: 0, coupling=opaque_coupling))


def _specs_of(dag) -> dict:
    return {vertex: OPS.lookup(vertex.module) for vertex in dag.inner_vertices}


def _check_facets_that_apply(spec, dag, analysis) -> None:
    vertices = [v for v, s in _specs_of(dag).items() if s is spec]
    assert vertices, f"the example of {spec.name} does not use the op"
    producers = {vertex for group in analysis.prunable_groups for vertex, _ in group.producers}
    for vertex in vertices:
        holds_weights = any(True for _ in vertex.module.parameters(recurse=False))
        if vertex in producers and holds_weights:
            assert spec.importance is not None, f"{spec.name} produces channels but cannot rank them"
            assert isinstance(spec.importance(vertex.module, vertex), ChannelWeight)
    for site in analysis.consumer_sites:
        if site.vertex in vertices and site.kind == "norm":
            assert spec.masking is not None, f"{spec.name} normalises over channels without masking"


@pytest.mark.parametrize("spec", [s for s in OPS if s.example is not None], ids=lambda s: s.name)
def test_spec_example_converts_counts_and_removes_exactly(spec):
    torch.manual_seed(0)
    model, inputs = spec.example()
    model.eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=inputs)
    with torch.no_grad():
        assert dagprune.max_relative_difference(model(*inputs), dag(*inputs)) <= 1e-5
    assert dagprune.count_flops(dag, example_inputs=inputs).total > 0
    analysis = find_channel_groups(dag, example_inputs=inputs)
    _check_facets_that_apply(spec, dag, analysis)
    assert analysis.prunable_groups, f"the example of {spec.name} has nothing to prune"
    config = ChannelPruning(model=dag, input_shape_without_batch=None, pruning_proportion=0.99,
                            num_training_steps=1, example_inputs=inputs)
    gated = config.prepare_for_pruning().eval()
    for _ in random_gate_states(config, seed=0):
        assert_removal_matches_gates(config, gated, inputs)
