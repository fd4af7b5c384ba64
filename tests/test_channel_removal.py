"""Exact channel removal: for ANY gate state the slim model computes what the gated model computes.

For every model here (the hand-written zoo, one small timm model per family, random DAGs) the
tests set the gate logits to random states (hypothesis; all-open, all-closed and mixed groups)
and check, in eval mode, that

* ``slim(x)`` equals ``gated(x)`` within ``REMOVAL_TOLERANCE`` (relative to the output scale),
* ``count_flops(slim) / count_flops(original)`` equals ``cfg.current_hard_proportion()``,
* the slim model lints, holds no gate, and (for a subset) saves and loads bit-exactly.

Also: the freshly gated model (all gates open) equals the original, ``block_size`` rounding,
gradients reaching every gate logit, ``torch.compile`` and ONNX export of slim models, and the
errors of :class:`ChannelPruning`.

No gate state may leave a tensor axis without channels (``check_removal`` asserts it): groups
whose classes were spread over several tensors (the halves of a ``chunk`` after a grouped conv,
channel-shuffle branches) used to keep their one best channel in only one of them, and removal
then built zero-channel convolutions (``test_split_and_shuffle_states_keep_every_tensor``).
"""

from __future__ import annotations

import dataclasses
import io
import re
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import dagprune as dp
from dagprune.errors import PruningError
from dagprune_algorithms.pruning import ChannelGate, ChannelPruning, MaskApply, keep_mask_from_logits
from dagprune_algorithms.pruning.channel_groups import iter_layout_atoms

from random_dags import random_dag_model, random_dag_models
from zoo import ZOO, input_shapes, make_example_inputs, randomize_normalization_layers
from timm_families import make_weights_informative

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

# ------------------------------------------------------------------------------- named data
REMOVAL_TOLERANCE = 1e-4
"""``max_relative_difference(gated(x), slim(x))`` bound for any gate state."""

NOOP_TOLERANCE = 1e-5
"""Bound for the gated model with every gate open against the original DAG."""

FLOPS_TOLERANCE = 1e-6
"""Bound for ``|count_flops(slim) / count_flops(original) - current_hard_proportion()|``."""

PRUNING_PROPORTION = 0.999
"""Target handed to ChannelPruning. The checks here set gate states themselves, so the target only
has to be reachable: a random DAG may remove as little as a fifth of its FLOPs (random_dag_model(226)
with every prunable channel gone keeps 0.803)."""

ZOO_WITHOUT_PRUNABLE_GROUP: Dict[str, str] = {}
"""Zoo entries that have no prunable channel group -> the reason ``cfg.channel_groups[i].reason``
gives. Empty: every zoo entry has at least one prunable group (checked by
``test_zoo_entries_without_prunable_group_are_exactly_the_listed_ones``)."""

ZOO_PRUNABLE = sorted(name for name in ZOO if name not in ZOO_WITHOUT_PRUNABLE_GROUP)

ZOO_RANDOM_STATES = 6
"""Hypothesis examples (random gate states) per zoo entry, besides the fixed states."""

TIMM_DEFAULT_SUITE_RANDOM_STATES = 1
TIMM_DEFAULT_SUITE_FIXED_STATES = ("all_closed", "alternating")
"""What the default suite checks per timm model (the all-open no-op check always runs)."""

TIMM_RANDOM_STATES = 3
"""Hypothesis examples per timm model in the ``-m slow`` sweep, besides all fixed states."""

RANDOM_DAG_EXAMPLES = 30


@dataclasses.dataclass(frozen=True)
class TimmCase:
    """A timm model and how to build it small.

    Attributes:
        name: timm model name (``pretrained=False``).
        kwargs: extra ``timm.create_model`` arguments as ``(key, value)`` pairs.
        save_load: also check the slim model saves and loads bit-exactly (a subset, for time).
    """

    name: str
    kwargs: Tuple[Tuple[str, object], ...] = ()
    save_load: bool = False


TIMM_INPUT = (3, 64, 64)
SMALL_IMAGE = (("img_size", 64),)  # ViT-likes have a fixed input size: rebuild them at 64 px

TIMM_FAMILY_CASES: Dict[str, TimmCase] = {
    "resnet": TimmCase("resnet10t", save_load=True),
    "resnext": TimmCase("resnext26ts"),  # the smallest resnext
    "seresnext": TimmCase("seresnext26ts"),  # smaller than seresnext26d_32x4d
    "regnetx": TimmCase("regnetx_002"),
    "regnety": TimmCase("regnety_002"),
    "mobilenetv2": TimmCase("mobilenetv2_050"),
    "mobilenetv3": TimmCase("mobilenetv3_small_050", save_load=True),
    "tf_mobilenetv3": TimmCase("tf_mobilenetv3_small_minimal_100"),
    "efficientnet": TimmCase("efficientnet_b0"),
    "tf_efficientnet": TimmCase("tf_efficientnet_b0"),  # TF "SAME" padding
    "fbnetv3": TimmCase("fbnetv3_b"),
    "hardcorenas": TimmCase("hardcorenas_a"),
    "densenet": TimmCase("densenet121"),  # the smallest densenet
    "dla": TimmCase("dla46_c"),  # smaller than dla34
    "hrnet": TimmCase("hrnet_w18_small"),
    "convnext": TimmCase("convnext_atto", save_load=True),
    "convnextv2": TimmCase("convnextv2_atto"),
    "poolformer": TimmCase("poolformer_s12"),
    "caformer": TimmCase("caformer_s18"),
    "repvit": TimmCase("repvit_m1"),
    "efficientformerv2": TimmCase("efficientformerv2_s0", SMALL_IMAGE, save_load=True),
    "deit3": TimmCase("deit3_small_patch16_224", SMALL_IMAGE),
    "vit": TimmCase("vit_tiny_patch16_224", SMALL_IMAGE, save_load=True),
    "flexivit": TimmCase("flexivit_small", SMALL_IMAGE),
    # 86M parameters; in the default suite: ~6 s with one thread (under the 10 s limit)
    "beit": TimmCase("beit_base_patch16_224", SMALL_IMAGE),
}
"""timm family -> the model standing for it."""


# ------------------------------------------------------------------------------- helpers
def _flatten(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in _flatten(value[key])]
    return [t for item in value for t in _flatten(item)]




def create_timm_model(case: TimmCase, seed: int = 0) -> nn.Module:
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(case.name, pretrained=False, **dict(case.kwargs))
    return make_weights_informative(model, seed).eval()


@dataclasses.dataclass
class Prepared:
    """A model, its DAG, the ChannelPruning config and the gated model, ready for gate states."""

    dag: dp.DagModule
    cfg: ChannelPruning
    gated: dp.DagModule
    inputs: Tuple[torch.Tensor, ...]
    input_shape: object  # without batch; a tuple of shapes for several inputs
    original_flops: int

    @property
    def group_sizes(self) -> List[int]:
        return [gate.logits.numel() for gate in self.cfg.gates]


def prepare(model: nn.Module, input_shape, inputs: Sequence[torch.Tensor], **options) -> Prepared:
    dag = dp.build_from_unstructured_module(model.eval())
    dag.eval()
    cfg = ChannelPruning(dag, input_shape, PRUNING_PROPORTION, num_training_steps=100, **options)
    gated = cfg.prepare_for_pruning()
    gated.eval()
    assert len(cfg.gates) == len(cfg.prunable_groups) > 0
    for gate, group in zip(cfg.gates, cfg.prunable_groups):
        assert gate.logits.numel() == group.size  # one logit per channel class, not C*C
    return Prepared(dag, cfg, gated, tuple(inputs), input_shape, dp.count_flops(dag, input_shape).total)


def prepare_zoo(name: str, **options) -> Prepared:
    entry = ZOO[name]
    shapes = input_shapes(entry)
    shape = shapes[0] if len(shapes) == 1 else shapes
    return prepare(entry.factory(seed=0), shape, make_example_inputs(entry, batch_size=2), **options)


def prepare_timm(case: TimmCase) -> Prepared:
    inputs = (torch.randn((2, *TIMM_INPUT), generator=torch.Generator().manual_seed(0)),)
    return prepare(create_timm_model(case), TIMM_INPUT, inputs)


def set_gate_logits(cfg: ChannelPruning, logits: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for gate, values in zip(cfg.gates, logits):
            gate.logits.copy_(torch.as_tensor(values, dtype=gate.logits.dtype).reshape(gate.logits.shape))


def state_empties_a_tensor(cfg: ChannelPruning) -> bool:
    """True when the eval gate state keeps no channel of some tensor axis."""
    keep = cfg.kept_classes()
    analysis = cfg.analysis
    return any(len(atoms) and not keep[atoms].any()
               for vertex in analysis.dag.inner_vertices
               for atoms in iter_layout_atoms(analysis.layouts[vertex]))


def check_removal(prepared: Prepared, save_to=None) -> dp.DagModule:
    """Removes the closed channels of the current gate state and checks the slim model."""
    cfg, gated = prepared.cfg, prepared.gated
    assert not state_empties_a_tensor(cfg), "the gate state leaves a tensor axis with no channel"
    slim = cfg.remove_channels()
    slim.eval()
    slim.lint()
    assert isinstance(slim, dp.DagModule)
    assert not any(isinstance(m, (ChannelGate, MaskApply)) for m in slim.modules()), "slim model holds gates"
    with torch.no_grad():
        expected = gated(*prepared.inputs)
        actual = slim(*prepared.inputs)
    difference = dp.max_relative_difference(expected, actual)
    assert difference <= REMOVAL_TOLERANCE, f"slim differs from gated by {difference:.3g} (relative)"

    measured = dp.count_flops(slim, prepared.input_shape).total / prepared.original_flops
    predicted = cfg.current_hard_proportion()
    assert abs(measured - predicted) <= FLOPS_TOLERANCE, (
        f"slim FLOPs share {measured:.8f} != predicted {predicted:.8f}")

    if save_to is not None:
        loaded = dp.load_dag(slim.save(save_to))
        loaded.eval()
        slim_state, loaded_state = slim.state_dict(), loaded.state_dict()
        assert slim_state.keys() == loaded_state.keys()
        for key in slim_state:
            assert torch.equal(slim_state[key], loaded_state[key]), key
        with torch.no_grad():
            reloaded = loaded(*prepared.inputs)
        assert len(_flatten(actual)) == len(_flatten(reloaded))
        for a, b in zip(_flatten(actual), _flatten(reloaded)):
            assert a.dtype == b.dtype and torch.equal(a, b), "loaded slim model is not bit-exact"
    return slim


# -- gate states ----------------------------------------------------------------------------
def _logits_for_mode(size: int, mode: str, seed: int, bias: float) -> torch.Tensor:
    noise = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    if mode == "closed":  # every logit <= 0: the group keeps its single best channel
        return -noise.abs() - 0.01
    if mode == "zeros":  # all logits exactly 0 (closed, all tied)
        return torch.zeros(size)
    if mode == "open":
        return noise.abs() + 0.01
    return noise + bias  # mixed; ``bias`` moves the kept share from few to most channels


def gate_states(sizes: Sequence[int]):
    """Hypothesis strategy: one logits tensor per gate, random floats per group in one of the
    modes mixed / all-closed / all-zero / all-open (the floats are generated from a drawn seed,
    so that groups of thousands of channels stay cheap to draw)."""
    group = st.tuples(st.sampled_from(["mixed", "mixed", "closed", "open", "zeros"]),
                      st.integers(0, 2**31 - 1), st.floats(-2.0, 2.0, allow_nan=False))
    return st.tuples(*[group.map(lambda drawn, n=n: _logits_for_mode(n, *drawn)) for n in sizes])


def fixed_states(sizes: Sequence[int]) -> Dict[str, List[torch.Tensor]]:
    """States every model is checked on, whatever hypothesis draws."""
    return {
        "all_open": [torch.full((n,), 3.0) for n in sizes],
        "all_closed": [_logits_for_mode(n, "closed", seed, 0.0) for seed, n in enumerate(sizes)],
        "mixed": [_logits_for_mode(n, "mixed", 100 + seed, 0.0) for seed, n in enumerate(sizes)],
        # some groups pruned next to fully open ones: a reshape sized by a run-time ``C`` of a
        # pruned residual stream while the attention dims stay whole (tiny_vit, caformer)
        "alternating": [_logits_for_mode(n, "mixed" if seed % 2 == 0 else "open", 200 + seed, 0.0)
                        for seed, n in enumerate(sizes)],
    }


RANDOM_STATE_SETTINGS = dict(
    deadline=None, database=None,
    # no shrinking: one example costs a removal and two forward passes (up to seconds), and
    # shrinking a failure took > 5 minutes; the failing logits are printed as drawn
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_random_states(prepared: Prepared, max_examples: int, tmp_path, save_load: bool,
                        fixed: Sequence[str] = ("all_open", "all_closed", "mixed", "alternating")) -> None:
    """The no-op check, the ``fixed`` states (all-closed saved and reloaded), then random states."""
    cfg = prepared.cfg
    with torch.no_grad():  # fresh gates are all open: the gated model is the original one
        difference = dp.max_relative_difference(prepared.dag(*prepared.inputs),
                                                prepared.gated(*prepared.inputs))
    assert difference <= NOOP_TOLERANCE, f"gated model with open gates differs by {difference:.3g}"
    for name, logits in fixed_states(prepared.group_sizes).items():
        if name not in fixed:
            continue
        set_gate_logits(cfg, logits)
        slim = check_removal(prepared, tmp_path / name if save_load and name == "all_closed" else None)
        if name == "all_open":
            assert cfg.current_hard_proportion() == pytest.approx(1.0, abs=FLOPS_TOLERANCE)
            assert sum(p.numel() for p in slim.parameters()) == sum(p.numel() for p in prepared.dag.parameters())
        if name == "all_closed":
            assert cfg.current_hard_proportion() == pytest.approx(
                1 - cfg.max_removable_proportion, abs=FLOPS_TOLERANCE)

    @settings(max_examples=max_examples, **RANDOM_STATE_SETTINGS)
    @given(logits=gate_states(prepared.group_sizes))
    def random_state(logits):
        set_gate_logits(cfg, logits)
        check_removal(prepared)

    random_state()


# ------------------------------------------------------------------------------- zoo
def test_zoo_entries_without_prunable_group_are_exactly_the_listed_ones():
    for name, entry in sorted(ZOO.items()):
        shapes = input_shapes(entry)
        dag = dp.build_from_unstructured_module(entry.factory(seed=0).eval())
        cfg = ChannelPruning(dag, shapes[0] if len(shapes) == 1 else shapes, PRUNING_PROPORTION, 100)
        if name in ZOO_WITHOUT_PRUNABLE_GROUP:
            with pytest.raises(PruningError, match="no prunable"):
                cfg.prepare_for_pruning()
            continue
        cfg.prepare_for_pruning()
        assert cfg.prunable_groups, f"{name} has no prunable group; list it in ZOO_WITHOUT_PRUNABLE_GROUP"
        for group in cfg.channel_groups:
            assert group.prunable or group.reason, f"{name}: group {group.name} blocked without a reason"


@pytest.mark.parametrize("name", ZOO_PRUNABLE)
def test_zoo_removal_is_exact_for_random_gate_states(name, tmp_path):
    check_random_states(prepare_zoo(name), ZOO_RANDOM_STATES, tmp_path, save_load=True)


# ------------------------------------------------------------------------------- timm
def _timm_params():
    return [pytest.param(case, id=f"{family}-{case.name}") for family, case in TIMM_FAMILY_CASES.items()]


@pytest.mark.parametrize("case", _timm_params())
def test_timm_removal_is_exact_for_random_gate_states(case, tmp_path):
    # fewer states than the zoo: each costs three forward passes of a real network
    check_random_states(prepare_timm(case), TIMM_DEFAULT_SUITE_RANDOM_STATES, tmp_path,
                        case.save_load, fixed=TIMM_DEFAULT_SUITE_FIXED_STATES)


@pytest.mark.slow
@pytest.mark.parametrize("case", _timm_params())
def test_timm_removal_is_exact_for_more_gate_states(case, tmp_path):
    check_random_states(prepare_timm(case), TIMM_RANDOM_STATES, tmp_path, case.save_load)


# ------------------------------------------------------------------------------- random DAGs
@settings(max_examples=RANDOM_DAG_EXAMPLES, **RANDOM_STATE_SETTINGS)
@given(model_and_shape=random_dag_models(), data=st.data())
def test_random_dag_conversion_and_removal_are_exact(model_and_shape, data):
    model, input_shape = model_and_shape
    model.eval()
    inputs = (torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0)),)
    prepared = prepare(model, input_shape, inputs)
    with torch.no_grad():
        conversion = dp.max_relative_difference(model(*inputs), prepared.dag(*inputs))
        noop = dp.max_relative_difference(prepared.dag(*inputs), prepared.gated(*inputs))
    assert conversion <= NOOP_TOLERANCE, f"conversion of {model.plan} differs by {conversion:.3g}"
    assert noop <= NOOP_TOLERANCE
    set_gate_logits(prepared.cfg, data.draw(gate_states(prepared.group_sizes), label="logits"))
    check_removal(prepared)


def _random_dag_state(seed: int, state: str):
    def build():
        model, input_shape = random_dag_model(seed)
        inputs = (torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0)),)
        prepared = prepare(model, input_shape, inputs)
        return prepared, fixed_states(prepared.group_sizes)[state]
    return build


def _zoo_state(name: str, state: str):
    def build():
        prepared = prepare_zoo(name)
        return prepared, fixed_states(prepared.group_sizes)[state]
    return build


SPLIT_AND_SHUFFLE_CASES = {
    # a 4-group conv ties whole conv groups into classes; chunk(2) puts half of them in each half
    "random_dag_72-mixed": _random_dag_state(72, "mixed"),  # plan ['se', 'grouped', 'split']
    "random_dag_49-all_closed": _random_dag_state(49, "all_closed"),  # ['concat', 'depthwise', 'conv']
    "random_dag_28-all_closed": _random_dag_state(28, "all_closed"),  # ['split', 'residual', 'grouped']
    # the channel shuffles tie branch1 and branch2 outputs; chunk halves hold half the classes
    "zoo_shufflenetv2-all_closed": _zoo_state("shufflenetv2_split_shuffle", "all_closed"),
    "zoo_shufflenetv2-mixed": _zoo_state("shufflenetv2_split_shuffle", "mixed"),
}
"""Models and states that left a tensor with 0 channels before groups were formed per tensor
signature (removal built zero-channel convs); regression tests."""


@pytest.mark.parametrize("case", sorted(SPLIT_AND_SHUFFLE_CASES))
def test_split_and_shuffle_states_keep_every_tensor(case):
    prepared, logits = SPLIT_AND_SHUFFLE_CASES[case]()
    set_gate_logits(prepared.cfg, logits)
    check_removal(prepared)


# ------------------------------------------------------------------------------- block size
def _odd_width_chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
        nn.Conv2d(10, 13, 3, padding=1, bias=False), nn.BatchNorm2d(13), nn.ReLU(),
        nn.Conv2d(13, 16, 1), nn.ReLU(),
        nn.Conv2d(16, 7, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 3))


@settings(max_examples=25, **RANDOM_STATE_SETTINGS)
@given(data=st.data())
def test_block_size_keeps_multiples_of_the_block(data):
    block = 4
    with torch.random.fork_rng(devices=[]):
        model = randomize_normalization_layers(_odd_width_chain(), torch.Generator().manual_seed(1))
    inputs = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
    prepared = prepare(model, (3, 8, 8), inputs, block_size=block)
    assert prepared.group_sizes == [10, 13, 16, 7]
    set_gate_logits(prepared.cfg, data.draw(gate_states(prepared.group_sizes), label="logits"))
    slim = check_removal(prepared)
    convs = [m for m in slim.modules() if isinstance(m, nn.Conv2d)]
    for conv, size, gate in zip(convs, prepared.group_sizes, prepared.cfg.gates):
        kept = conv.out_channels
        assert kept % block == 0 or kept == size, f"{kept} of {size} channels kept"
        assert kept == int(keep_mask_from_logits(gate.logits, block).sum())


@settings(max_examples=200, deadline=None)
@given(logits=st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=1, max_size=40),
       block=st.integers(1, 8))
def test_keep_mask_from_logits_rounds_up_to_the_block(logits, block):
    logits = torch.tensor(logits)
    keep = keep_mask_from_logits(logits, block)
    size, positive = logits.numel(), int((logits > 0).sum())
    expected = min(size, -(-max(positive, 1) // block) * block)
    assert keep.dtype == torch.bool and keep.shape == logits.shape
    assert int(keep.sum()) == expected
    assert bool(keep[logits > 0].all()), "an open channel was dropped"
    if not keep.all():
        assert logits[keep].min() >= logits[~keep].max(), "kept channels are not the best ones"


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.sampled_from([-2.0, -0.5, -0.0, 0.0, 0.5, 2.0, 1e-30, -1e-30, 3.4e38, -3.4e38]) |
                       st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=60),
       cuts=st.lists(st.integers(1, 59), max_size=6))
def test_ranks_within_groups_equal_two_stable_sorts(values, cuts):
    """The one-sort ranking (int64 keys) ranks as sorting by value, then stably by group."""
    from dagprune_algorithms.pruning.gates import _ranks_within_groups
    logits = torch.tensor(values, dtype=torch.float32)
    bounds = sorted({c for c in cuts if c < len(values)} | {0, len(values)})
    sizes = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])])
    group_index = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    by_value = torch.sort(logits, descending=True, stable=True).indices
    order = by_value[torch.sort(group_index[by_value], stable=True).indices]
    expected = torch.empty_like(order)
    expected[order] = torch.arange(order.numel()) - (torch.cumsum(sizes, 0) - sizes)[group_index[order]]
    assert torch.equal(_ranks_within_groups(logits, group_index, sizes), expected)
    assert torch.equal(_ranks_within_groups(logits.double(), group_index, sizes), expected)


def test_block_size_on_a_residual_model_keeps_multiples_in_every_group():
    prepared = prepare_zoo("resnet_basic_blocks", block_size=4)
    set_gate_logits(prepared.cfg, fixed_states(prepared.group_sizes)["mixed"])
    keep = prepared.cfg.kept_classes()
    for group in prepared.cfg.prunable_groups:
        kept = int(keep[group.classes].sum())
        assert kept % 4 == 0 or kept == group.size, f"{group.name}: {kept} of {group.size}"
    check_removal(prepared)


# ------------------------------------------------------------------------------- gradients
GRADIENT_ZOO = ["resnet_basic_blocks", "densenet_concat", "groupnorm", "convnext_layernorm",
                "tiny_vit", "attention_block_sdpa"]
GRADIENT_TIMM = ["resnet", "vit"]


def _check_gradients_reach_every_gate(prepared: Prepared) -> None:
    cfg, gated = prepared.cfg, prepared.gated
    gated.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # the model output alone must reach every gate (through the masks, not via a penalty)
        outputs = gated(*prepared.inputs)
        sum(t.sum() for t in _flatten(outputs)).backward()
        for group, gate in zip(cfg.prunable_groups, cfg.gates):
            assert gate.logits.grad is not None, f"no gradient reaches gate of {group.name}"
            assert bool((gate.logits.grad != 0).any()), f"zero gradient at gate of {group.name}"
            gate.logits.grad = None
        # the loss of the brief: outputs plus the keep probabilities
        outputs = gated(*prepared.inputs)
        loss = sum(t.sum() for t in _flatten(outputs)) + sum(g.keep_probabilities().sum() for g in cfg.gates)
        loss.backward()
    for group, gate in zip(cfg.prunable_groups, cfg.gates):
        assert gate.logits.grad is not None and bool((gate.logits.grad != 0).any()), group.name
        assert torch.isfinite(gate.logits.grad).all()


@pytest.mark.parametrize("name", GRADIENT_ZOO)
def test_gradient_reaches_every_gate_logit_zoo(name):
    _check_gradients_reach_every_gate(prepare_zoo(name))


@pytest.mark.parametrize("family", GRADIENT_TIMM)
def test_gradient_reaches_every_gate_logit_timm(family):
    _check_gradients_reach_every_gate(prepare_timm(TIMM_FAMILY_CASES[family]))


# ------------------------------------------------------------------------------- compile / ONNX
DEPLOY_ZOO = ["resnet_basic_blocks", "tiny_vit"]  # one CNN, one ViT-like


def _mixed_slim(name: str) -> Tuple[Prepared, dp.DagModule]:
    prepared = prepare_zoo(name)
    set_gate_logits(prepared.cfg, fixed_states(prepared.group_sizes)["mixed"])
    slim = check_removal(prepared)
    assert prepared.cfg.current_hard_proportion() < 0.9  # something was removed
    return prepared, slim


def _check_compiled(name: str, backend: str) -> None:
    prepared, slim = _mixed_slim(name)
    torch._dynamo.reset()
    compiled = torch.compile(slim, backend=backend, fullgraph=True)
    with torch.no_grad():
        expected, actual = slim(*prepared.inputs), compiled(*prepared.inputs)
    assert dp.max_relative_difference(expected, actual) <= REMOVAL_TOLERANCE
    torch._dynamo.reset()


@pytest.mark.parametrize("name", DEPLOY_ZOO)
def test_slim_model_runs_under_torch_compile(name):
    # inductor works on this CPU machine but costs 8-30 s per model (C++ compilation, 2 cores);
    # the default suite uses aot_eager (dynamo capture + AOT autograd), inductor is in the slow test
    _check_compiled(name, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", DEPLOY_ZOO)
def test_slim_model_runs_under_torch_compile_inductor(name):
    _check_compiled(name, "inductor")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                            "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", DEPLOY_ZOO)
def test_slim_model_exports_to_onnx(name):
    pytest.importorskip("onnx", reason="ONNX export test needs the 'onnx' extra: pip install -e '.[onnx]'")
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install -e '.[onnx]'")
    prepared, slim = _mixed_slim(name)
    buffer = io.BytesIO()
    names = [f"input_{i}" for i in range(len(prepared.inputs))]
    # the TorchScript-based exporter: the dynamo exporter needs onnxscript, not a dependency here
    torch.onnx.export(slim, prepared.inputs, buffer, dynamo=False, input_names=names)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    results = session.run(None, {n: x.numpy() for n, x in zip(names, prepared.inputs)})
    with torch.no_grad():
        expected = _flatten(slim(*prepared.inputs))
    assert len(results) == len(expected)
    for reference, result in zip(expected, results):
        assert dp.max_relative_difference(reference, torch.from_numpy(result)) <= REMOVAL_TOLERANCE


# ------------------------------------------------------------------------------- errors
def _small_dag() -> dp.DagModule:
    return dp.build_from_unstructured_module(ZOO["resnext_grouped"].factory(seed=0).eval())


@pytest.mark.parametrize("proportion", [0, 1, 1.5, -0.1, "0.5", float("nan"), None])
def test_pruning_proportion_outside_the_open_unit_interval_is_an_error(proportion):
    with pytest.raises(PruningError, match="pruning_proportion"):
        ChannelPruning(_small_dag(), ZOO["resnext_grouped"].input_shape, proportion, 100)


def test_model_without_prunable_group_is_an_error():
    dag = dp.build_from_unstructured_module(nn.Sequential(nn.Linear(4, 2)))
    with pytest.raises(PruningError, match="no prunable"):
        ChannelPruning(dag, (4,), 0.5, 100).prepare_for_pruning()


def _numbers(message: str) -> List[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+|\d+", message)]


def test_unreachable_target_is_an_error_with_both_numbers():
    shape = ZOO["resnext_grouped"].input_shape
    reference = ChannelPruning(_small_dag(), shape, 0.5, 100)
    reference.prepare_for_pruning()
    reachable = 1 - reference.max_removable_proportion
    assert 0.05 < reachable < 0.5  # grouped convs keep a share of the FLOPs that cannot go
    target = round(reachable / 2, 3)
    with pytest.raises(PruningError) as raised:
        ChannelPruning(_small_dag(), shape, target, 100).prepare_for_pruning()
    numbers = _numbers(str(raised.value))
    assert any(abs(n - target) < 1e-3 for n in numbers), f"target {target} not in: {raised.value}"
    assert any(abs(n - reachable) < 1e-3 for n in numbers), f"reachable {reachable:.4f} not in: {raised.value}"
    ChannelPruning(_small_dag(), shape, min(0.99, reachable + 0.01), 100).prepare_for_pruning()  # reachable


def test_plain_module_instead_of_dag_is_an_error():
    with pytest.raises(PruningError, match="build_from_unstructured_module"):
        ChannelPruning(ZOO["resnext_grouped"].factory(seed=0), ZOO["resnext_grouped"].input_shape, 0.5, 100)


class _TiedLanguageModel(nn.Module):
    """An embedding whose weight is also the output head's (tied), a residual MLP between."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.up, self.down = nn.Linear(12, 24), nn.Linear(24, 12)
        self.head = nn.Linear(12, 30, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.down(torch.relu(self.up(x))))


def test_removal_keeps_tied_weights_tied():
    torch.manual_seed(0)
    model = _TiedLanguageModel().eval()
    example = (torch.randint(0, 30, (2, 5)),)
    dag = dp.build_from_unstructured_module(model, example_inputs=example)
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    generator = torch.Generator().manual_seed(1)
    for gate in pruning.gates:
        gate.logits.data = torch.randn(gate.logits.shape, generator=generator)
    slim = pruning.remove_channels().eval()
    modules = {v.qualified_name: v.module for v in slim.inner_vertices}
    assert modules["head"].weight is modules["embed"].weight
    assert modules["embed"].weight.shape[1] < 12  # the tied width was pruned, once
    ids = torch.randint(0, 30, (3, 4))
    with torch.no_grad():
        assert dp.max_relative_difference(gated.eval()(ids), slim(ids)) <= 1e-4
