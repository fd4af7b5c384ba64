"""Conversion is exact: ``build_from_unstructured_module(model)`` computes what ``model`` computes.

Checked in eval mode and in train mode (same outputs, and batch-norm running statistics updated
exactly as the original's) over the hand-written zoo, random DAGs and one small timm model per
family (``timm_families.TIMM_FAMILY_MODELS``). Also: models torch.fx cannot trace fail with a
helpful ``ConversionError`` and convert once the culprit is a leaf; ``lint`` catches broken DAGs.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dagprune
from dagprune.errors import ConversionError, DagLintError
from equivalence import assert_outputs_close
from random_dags import random_dag_model, random_dag_models
from timm_families import create_timm_model, timm_params
from zoo import ZOO, make_example_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RANDOM_DAG_SEEDS = range(10)
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _assert_converts_exactly(model: nn.Module, inputs: tuple,
                             leaf_modules=()) -> dagprune.DagModule:
    """Converts ``model`` and checks eval mode, then one train-mode step; returns the DAG."""
    model.eval()
    dag = dagprune.build_from_unstructured_module(model, leaf_modules=leaf_modules)
    assert not dag.training
    with torch.no_grad():
        assert_outputs_close(model(*inputs), dag(*inputs))
    _assert_train_step_matches(model, dag, inputs)
    return dag


def _assert_train_step_matches(model: nn.Module, dag: dagprune.DagModule, inputs: tuple) -> None:
    model, dag = copy.deepcopy(model).train(), copy.deepcopy(dag).train()
    statistics_before = {name: buffer.clone() for name, buffer in model.named_buffers()
                         if name.endswith(STATISTICS)}
    with torch.no_grad():
        torch.manual_seed(0)
        expected = model(*inputs)
        torch.manual_seed(0)
        actual = dag(*inputs)
    assert_outputs_close(expected, actual)

    original = dict(model.named_buffers())
    matched = {}
    for vertex in dag.inner_vertices:
        for buffer_name, buffer in vertex.module.named_buffers():
            if buffer_name.endswith(STATISTICS):
                matched[_original_name(original, vertex.qualified_name, buffer_name)] = buffer
    assert set(matched) == set(statistics_before), "every batch-norm statistic has one DAG copy"
    for name, buffer in matched.items():
        assert torch.equal(buffer, original[name]), f"{name} updated differently"
    if statistics_before:
        assert any(not torch.equal(before, original[name])
                   for name, before in statistics_before.items()), "train step updated nothing"


def _original_name(original: dict, qualified_name: str | None, buffer_name: str) -> str:
    """The original model's name of a DAG vertex's buffer.

    Rewrites (timm's fused norm + activation) nest the norm one level deeper than the original
    layer, so the vertex path is shortened until the buffer is found.
    """
    parts = (qualified_name or "").split(".")
    while parts:
        candidate = ".".join([*parts, buffer_name])
        if candidate in original:
            return candidate
        parts.pop()
    raise AssertionError(f"no original buffer for {qualified_name}.{buffer_name}")


# --------------------------------------------------------------------------------- model lists
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_converts_exactly(name):
    entry = ZOO[name]
    _assert_converts_exactly(entry.factory(), make_example_inputs(entry, batch_size=2))


@pytest.mark.parametrize("seed", RANDOM_DAG_SEEDS)
def test_random_dag_converts_exactly(seed):
    model, input_shape = random_dag_model(seed)
    inputs = (torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(seed)),)
    _assert_converts_exactly(model, inputs)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_and_shape=random_dag_models(), batch_size=st.integers(1, 3))
def test_any_random_dag_converts_exactly(model_and_shape, batch_size):
    model, input_shape = model_and_shape
    inputs = (torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)),)
    _assert_converts_exactly(model, inputs)


@pytest.mark.parametrize("case", timm_params())
def test_timm_family_model_converts_exactly(case):
    model = create_timm_model(case)
    inputs = (torch.randn(2, *case.input_size, generator=torch.Generator().manual_seed(0)),)
    dag = _assert_converts_exactly(model, inputs)
    dag.lint()


def test_conversion_follows_the_model_mode_and_copies_parameters():
    entry = ZOO["resnet_basic_blocks"]
    model = entry.factory().train()
    dag = dagprune.build_from_unstructured_module(model)
    assert dag.training
    with torch.no_grad():
        next(dag.parameters()).add_(1.0)
    assert not any(p is q for p in dag.parameters() for q in model.parameters())
    assert not torch.equal(next(dag.parameters()), next(model.parameters()))


class _OptionalArguments(nn.Module):
    """``forward(x, mask=None, is_causal=False)`` as timm's Hiera and ViTs: the mask branches
    read the mask, the head runs only without it, and a flag is branched on."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Linear(4, 2)

    def forward(self, x, mask=None, is_causal: bool = False):
        x = self.conv(x)
        if mask is not None or is_causal:
            x = x * mask.view(x.shape[0], 1, *x.shape[2:])
        x = x.mean((2, 3))
        return self.head(x) if mask is None else x


def test_arguments_with_defaults_are_fixed_to_them_without_example_inputs():
    # traced as proxies, `mask is not None` took the branch for a given mask: the DAG read
    # mask.view and failed on dag(x) (timm's hiera_* models, coverage sweep)
    model = _OptionalArguments().eval()
    dag = dagprune.build_from_unstructured_module(model)
    assert [(v.name, v.fixed) for v in dag.inputs] == [("x", False), ("mask", True), ("is_causal", True)]
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(model(x), dag(x))
    with pytest.raises(TypeError, match=r"with mask=None fixed, got a tensor of shape \(2, 16\) \(torch.float32\)"):
        dag(x, torch.ones(2, 16))


# --------------------------------------------------------------------------------- untraceable
class DataDependentGate(nn.Module):
    """Branches on the data: torch.fx cannot trace this."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -x


class ModelWithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), DataDependentGate(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_untraceable_module_error_names_path_line_and_remedy():
    with pytest.raises(ConversionError) as caught:
        dagprune.build_from_unstructured_module(ModelWithGate())
    message = str(caught.value)
    assert "'body.1'" in message and "DataDependentGate" in message
    assert "if x.sum() > 0:" in message and "test_conversion.py" in message
    assert "leaf_modules=[DataDependentGate]" in message


def test_untraceable_root_forward_suggests_moving_the_code_into_a_submodule():
    with pytest.raises(ConversionError) as caught:
        dagprune.build_from_unstructured_module(DataDependentGate(3))
    message = str(caught.value)
    assert "'<root>'" in message and "if x.sum() > 0:" in message
    assert "Move that code into a submodule" in message and "'<root>'" not in message.split("at ")[-1]


@pytest.mark.parametrize("leaf", [DataDependentGate, "body.1"], ids=["by-type", "by-name"])
def test_untraceable_module_converts_as_a_leaf(leaf):
    torch.manual_seed(0)
    model = ModelWithGate()
    inputs = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
    dag = _assert_converts_exactly(model, inputs, leaf_modules=[leaf])
    gates = [v for v in dag.inner_vertices if isinstance(v.module, DataDependentGate)]
    assert [v.qualified_name for v in gates] == ["body.1"]
    with torch.no_grad():
        for x in (inputs[0].abs(), -inputs[0].abs()):  # both branches of the gate
            assert_outputs_close(model(x), dag(x))


# --------------------------------------------------------------------------------- lint
def _small_dag() -> dagprune.DagModule:
    entry = ZOO["resnet_basic_blocks"]
    return dagprune.build_from_unstructured_module(entry.factory().eval())


def test_lint_accepts_converted_dags():
    _small_dag().lint()


def test_lint_catches_vertices_out_of_topological_order():
    dag = _small_dag()
    index = next(i for i, v in enumerate(dag.inner_vertices)
                 if i > 0 and dag.inner_vertices[i - 1] in v.predecessors)
    vertices = dag.inner_vertices
    vertices[index - 1], vertices[index] = vertices[index], vertices[index - 1]
    dag.refresh()
    with pytest.raises(DagLintError, match="not an earlier vertex"):
        dag.lint()


def test_lint_catches_predecessors_from_another_dag():
    dag, other = _small_dag(), _small_dag()
    dag.inner_vertices[3].predecessors = list(other.inner_vertices[2:3])
    with pytest.raises(DagLintError, match="not an earlier vertex"):
        dag.lint()


def test_lint_catches_duplicate_names():
    dag = _small_dag()
    dag.inner_vertices[2].name = dag.inner_vertices[1].name
    with pytest.raises(DagLintError, match="duplicate vertex name"):
        dag.lint()


def test_lint_catches_outputs_outside_the_dag():
    dag, other = _small_dag(), _small_dag()
    dag.output_vertices = [other.output_vertices[0]]
    with pytest.raises(DagLintError, match="output"):
        dag.lint()


def test_several_outputs_default_to_a_tuple_and_lint_catches_dropped_outputs():
    x = dagprune.InputVertex("x")
    relu = dagprune.InnerVertex("relu", nn.ReLU(), [x])
    tanh = dagprune.InnerVertex("tanh", nn.Tanh(), [x])
    dag = dagprune.DagModule([x], [relu, tanh], [tanh, relu])
    value = torch.tensor([-1.0, 2.0])
    first, second = dag(value)
    assert torch.equal(first, torch.tanh(value)) and torch.equal(second, torch.relu(value))
    dag.lint()
    dropped = dagprune.DagModule([x], [relu, tanh], [tanh, relu], output_structure=dagprune.ops.InputRef(0))
    with pytest.raises(DagLintError, match=r"output vertices \['relu'\] are not in the output structure"):
        dropped.lint()


def test_timm_drop_path_keeps_dropping_in_train_mode(tmp_path):
    """timm's DropPath branches on ``self.training``; the DAG must drop the same paths in
    training (same random draws) and be the identity in eval, and save/load."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, drop_path_rate=0.5,
                              zero_init_last=False).train()  # zero-init branches hide drops
    dag = dagprune.build_from_unstructured_module(model)
    assert any(isinstance(v.module, dagprune.ops.StochasticDepth) for v in dag.inner_vertices)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs = []
    for module in (model, dag):
        torch.manual_seed(1)
        outputs.append(module(x))
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    loaded = dagprune.load_dag(dag.save(tmp_path / "dag"))
    model.eval(), dag.eval(), loaded.eval()
    with torch.no_grad():  # one identical train step each: the same batch-norm statistics
        assert torch.allclose(model(x), dag(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(dag(x), loaded(x))
    dag.train()
    torch.manual_seed(2)
    assert not torch.allclose(dag(x), outputs[1], rtol=1e-5, atol=1e-5)  # other draws, other paths


class _OwnCopy(nn.Module):
    """A layer with its own deep-copy protocol (copied by copy.deepcopy, not rebuilt)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.copies = 0

    def __deepcopy__(self, memo):
        new = _OwnCopy()
        new.scale = nn.Parameter(self.scale.detach().clone())
        new.copies = self.copies + 1
        return new

    def forward(self, x):
        return x * self.scale


def test_the_converted_model_shares_nothing_with_the_original_but_keeps_shared_weights_shared():
    from dagprune.module_copy import copy_module

    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, _OwnCopy(), shared, nn.BatchNorm1d(3))
    model[3].running_mean.add_(1.0)
    model.extra = {"table": [1, 2]}
    copied = copy_module(model)
    assert copied[0] is copied[2] and copied[0] is not shared
    assert copied[1].copies == 1  # its own __deepcopy__ ran
    assert copied.extra == model.extra and copied.extra is not model.extra
    assert copied[0]._forward_hooks == {} and copied[0]._forward_hooks is not shared._forward_hooks
    copied[0].register_forward_hook(lambda *args: None)  # a hook on the copy stays on the copy
    assert not shared._forward_hooks and copied[3].eps == model[3].eps
    assert copied[3]._non_persistent_buffers_set is not model[3]._non_persistent_buffers_set
    originals = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not originals & {t.data_ptr() for t in [*copied.parameters(), *copied.buffers()]}
    assert all(type(a) is type(b) and a.requires_grad == b.requires_grad and torch.equal(a, b)
               for a, b in zip([*model.parameters(), *model.buffers()], [*copied.parameters(), *copied.buffers()]))
    x = torch.randn(4, 3)
    assert torch.equal(copied.eval()(x), model.eval()(x))
    dag = dagprune.build_from_unstructured_module(model)
    assert torch.equal(dag(x), model(x))
    with torch.no_grad():
        dag.vertex("_0").module.weight.add_(1.0)
    assert not torch.equal(dag(x), model(x))  # the DAG's weights are its own


def test_converting_without_a_copy_shares_the_weights_and_leaves_the_model_as_it_was():
    """``copy_model=False``: the DAG uses the model's own parameters, and the module rewrites
    (timm's fused norm + activation becomes norm, then activation) happen on shallow copies, so
    the model keeps its module types and state-dict keys (its checkpoints still load)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10).eval()
    keys, types = list(model.state_dict()), [type(m) for m in model.modules()]
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    dag = dagprune.build_from_unstructured_module(model, copy_model=False)
    assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == types
    assert torch.equal(dag(x), expected) and torch.equal(model(x), expected)
    assert {p.data_ptr() for p in dag.parameters()} <= {p.data_ptr() for p in model.parameters()}
    with torch.no_grad():
        model.conv_stem.weight.mul_(2.0)  # shared: the DAG sees it
    assert torch.equal(dag(x), model(x)) and not torch.equal(dag(x), expected)


@pytest.mark.parametrize("copy_model", [True, False])
def test_a_module_used_twice_is_rewritten_once(copy_model):
    from timm.layers import BatchNormAct2d

    shared = BatchNormAct2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Conv2d(4, 4, 1), shared).eval()
    x = torch.randn(2, 3, 5, 5)
    dag = dagprune.build_from_unstructured_module(model, copy_model=copy_model)
    assert torch.allclose(dag(x), model(x), atol=1e-6)
    norms = {id(v.module) for v in dag.inner_vertices if isinstance(v.module, nn.BatchNorm2d)}
    assert len(norms) == 1  # one norm, called twice
    assert type(model[1]) is BatchNormAct2d and model[1] is model[3]


class _Sampler(nn.Module):
    """A VAE's reparametrised sample, drawn in every forward (``torch.randn_like``)."""

    def __init__(self):
        super().__init__()
        self.encode, self.mean, self.log_var = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4)
        self.decode = nn.Linear(4, 8)

    def forward(self, x):
        hidden = torch.relu(self.encode(x))
        mean, log_var = self.mean(hidden), self.log_var(hidden)
        return self.decode(mean + torch.randn_like(mean) * torch.exp(0.5 * log_var)), mean, log_var


def test_random_draws_in_forward_convert_and_draw_the_same_numbers_under_the_same_seed(tmp_path):
    model, x = _Sampler().eval(), torch.randn(3, 8)
    dag = dagprune.build_from_unstructured_module(model)
    dag.save(tmp_path / "dag")
    loaded = dagprune.load_dag(tmp_path / "dag")
    outputs = []
    for module in (model, dag, loaded):
        torch.manual_seed(1)
        outputs.append(module(x))
    assert all(torch.equal(a, b) for other in outputs[1:] for a, b in zip(outputs[0], other))


def test_an_unknown_torch_function_is_named_as_the_user_calls_it():
    from dagprune.ops.functions import function_name
    # torch's own functions report an internal class as their module (_VariableFunctionsClass)
    with pytest.raises(ConversionError, match=r"the function torch\.result_type is not one"):
        function_name(torch.result_type)


class _RunningAverage(nn.Module):
    """Subtracts a running average of its inputs, updated in train mode only."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("average", torch.zeros(width))

    def forward(self, x):
        if self.training:
            self.average.mul_(0.9).add_(0.1 * x.mean(0).detach())
        return x - self.average


class _WithTrainOnlyOps(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.encode, self.center, self.head = nn.Linear(4, 8), _RunningAverage(8), nn.Linear(8, 2)
        self.dropout = dropout

    def forward(self, x):
        hidden = self.center(self.encode(x))
        if self.training and self.dropout > 0:  # a branch the model as built never takes
            hidden = nn.functional.dropout(hidden, self.dropout)
        return self.head(hidden)


def test_a_module_running_other_ops_in_train_mode_is_named_with_the_fix():
    with pytest.warns(dagprune.errors.TrainingBranchWarning,
                      match=r"'center' \(_RunningAverage\).*leaf_modules=\[_RunningAverage\]"):
        dagprune.build_from_unstructured_module(_WithTrainOnlyOps())
    model = _WithTrainOnlyOps().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kept whole: nothing is left out, nothing to warn about
        dag = dagprune.build_from_unstructured_module(model, leaf_modules=[_RunningAverage]).train()
    x = torch.randn(5, 4)
    for _ in range(3):  # the running average moves alike in both
        assert torch.equal(model(x), dag(x))


def test_a_train_mode_branch_that_changes_nothing_is_not_reported():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.encode, self.head, self.dropout = nn.Linear(4, 8), nn.Linear(8, 2), 0.0

        def forward(self, x):
            hidden = self.encode(x)
            if self.training and self.dropout > 0:
                hidden = nn.functional.dropout(hidden, self.dropout)
            return self.head(hidden)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dagprune.build_from_unstructured_module(Plain())


def test_the_models_own_forward_is_checked_too():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.encode, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            hidden = self.encode(x)
            if self.training:
                hidden = hidden + 0.1 * torch.randn_like(hidden)
            return self.head(hidden)

    with pytest.warns(dagprune.errors.TrainingBranchWarning, match=r"module '<root>' \(Noisy\)"):
        dagprune.build_from_unstructured_module(Noisy())


class _Conv3x3(nn.Conv2d):
    """A user's convolution class: only a constructor of its own."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__(channels_in, channels_out, 3, padding=1, bias=False)

    def describe(self) -> str:  # a method of its own, which the layer's forward never calls
        return f"3x3 {self.in_channels}->{self.out_channels}"


class _ScaledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_a_layer_subclass_with_only_a_constructor_converts_saves_and_prunes_as_its_base(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(_Conv3x3(3, 8), nn.ReLU(), _Conv3x3(8, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    dag = dagprune.build_from_unstructured_module(model)
    assert [type(v.module) for v in dag.inner_vertices] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert type(model[0]) is _Conv3x3 and torch.equal(model(x), dag(x))  # the user's model untouched
    dag.save(tmp_path / "dag")  # as torch.nn.Conv2d: no serializer to register
    assert torch.equal(dagprune.load_dag(tmp_path / "dag")(x), dag(x))


def test_a_layer_subclass_that_redefines_forward_keeps_its_forward():
    model = nn.Sequential(_ScaledConv(3, 4, 1)).eval()
    x = torch.randn(1, 3, 4, 4)
    dag = dagprune.build_from_unstructured_module(model)
    assert not any(type(v.module) is nn.Conv2d for v in dag.inner_vertices)
    assert torch.equal(model(x), dag(x))
