"""Saving leaf modules that have no constructor-argument description, by their structure.

timm's untraceable blocks (kept whole as leaf vertices) and torch layers whose constructor
arguments are not stored (``nn.LSTM``, ``nn.TransformerEncoderLayer``) are saved as their
attributes, submodules and tensor shapes. The loaded DAG must compute bit for bit what the saved
one does, hold the same state and the same module types, keep non-persistent buffers and shared
modules, and a file naming a type outside the allowlist must be refused before anything of it is
instantiated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import dagprune
from dagprune.errors import SerializationError

from informative_weights import make_weights_informative

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# timm models whose untraceable blocks stay leaf vertices, built small: (name, kwargs, input px).
TIMM_LEAF_MODELS = {
    "mobilevit_xxs": ({}, 64),  # MobileVitBlock; any size divisible by 32
    "efficientvit_b0": ({}, 64),  # LiteMLA
    "tiny_vit_5m_224": ({}, 64),  # TinyVitBlock; no img_size argument, pads to its windows
    "convit_tiny": ({"img_size": 64}, 64),  # GPSA
    # LocalWindowAttention: an eval-mode cache of attention biases (saved empty, refilled)
    "efficientvit_m0": ({"img_size": 64}, 64),
}


# --------------------------------------------------------------------------------- models
class SequenceModel(nn.Module):
    """A batch-first LSTM read by a linear head."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        output, _ = self.lstm(x)
        return self.head(output[:, -1])


class TransformerModel(nn.Module):
    """A batch-first transformer encoder layer with GELU between projections."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation="gelu",
                                                  batch_first=True)

    def forward(self, x):
        return self.encoder(self.embed(x))


@dagprune.register_leaf_module
class ShiftedScale(nn.Module):
    """A hand-written leaf: ``(x - shift) * scale + offset`` with a non-persistent ``shift``."""

    def __init__(self, channels: int, offset: float, window: tuple):
        super().__init__()
        self.offset = offset
        self.window = window
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.register_buffer("shift", torch.arange(channels, dtype=torch.float32),
                             persistent=False)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace this, so it must be a leaf
            x = x * 1.0
        return (x - self.shift) * self.scale + self.offset * self.window[0]


class SharedLayerModel(nn.Module):
    """One linear layer called twice, and a second layer whose weight is tied to it."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.tied = nn.Linear(4, 4, bias=False)
        self.tied.weight = self.shared.weight

    def forward(self, x):
        return self.tied(self.shared(self.shared(x)))


# --------------------------------------------------------------------------------- helpers
def _round_trip(model: nn.Module, inputs: tuple, path: Path) -> tuple:
    dag = dagprune.build_from_unstructured_module(model.eval())
    with torch.no_grad():
        dag(*inputs)  # eval-mode caches (timm's attention biases) are full when saving
    loaded = dagprune.load_dag(dag.save(path))
    return dag, loaded, inputs


def _assert_same(dag: nn.Module, loaded: nn.Module, inputs: tuple) -> None:
    with torch.no_grad():
        expected, actual = dag(*inputs), loaded(*inputs)
    assert torch.equal(actual, expected)
    expected_state, loaded_state = dag.state_dict(), loaded.state_dict()
    assert list(loaded_state) == list(expected_state)
    for name, tensor in expected_state.items():
        assert loaded_state[name].dtype == tensor.dtype, name
        assert torch.equal(loaded_state[name], tensor), name
    assert [type(m) for m in loaded.modules()] == [type(m) for m in dag.modules()]


def _edit_graph(path: Path, edit) -> None:
    document = json.loads((path / "graph.json").read_text())
    edit(document)
    (path / "graph.json").write_text(json.dumps(document))


def _structural_vertex(document: dict) -> dict:
    return next(v["module"] for v in document["graph"]["vertices"]
                if "structure" in v["module"])


# --------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", sorted(TIMM_LEAF_MODELS))
def test_timm_leaf_blocks_round_trip_bit_exactly(name, tmp_path):
    kwargs, size = TIMM_LEAF_MODELS[name]
    model = make_weights_informative(timm.create_model(name, pretrained=False, **kwargs))
    inputs = (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)
    dag, loaded, inputs = _round_trip(model, inputs, tmp_path / name)
    assert any(type(v.module).__module__.startswith("timm.") for v in dag.inner_vertices)
    _assert_same(dag, loaded, inputs)


def test_dm_nfnet_traced_with_in_place_ops_round_trips_bit_exactly(tmp_path):
    """NormFreeBlock's in-place ``skipinit_gain`` multiply and GammaAct's ``act_fn(x).mul_(gamma)``
    (timm's gelu, saved by name) are traced vertices; saved and loaded, they still run in order."""
    model = make_weights_informative(timm.create_model("dm_nfnet_f0", pretrained=False))
    inputs = (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)),)
    dag, loaded, inputs = _round_trip(model, inputs, tmp_path / "dm_nfnet_f0")
    assert sum(getattr(v.module, "function_name", "") == "Tensor.mul_" for v in loaded.inner_vertices) > 12
    _assert_same(dag, loaded, inputs)


@pytest.mark.parametrize("model_type", [SequenceModel, TransformerModel])
def test_torch_layers_without_stored_constructor_arguments_round_trip(model_type, tmp_path):
    torch.manual_seed(0)
    inputs = (torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1)),)
    dag, loaded, inputs = _round_trip(model_type(), inputs, tmp_path / "dag")
    _assert_same(dag, loaded, inputs)


def test_registered_leaf_keeps_non_persistent_buffer_and_attributes(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), ShiftedScale(3, offset=0.25, window=(2, 3)))
    inputs = (torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),)
    dag, loaded, inputs = _round_trip(model, inputs, tmp_path / "dag")
    _assert_same(dag, loaded, inputs)
    leaf = next(m for m in loaded.modules() if isinstance(m, ShiftedScale))
    assert torch.equal(leaf.shift, torch.arange(3, dtype=torch.float32))
    assert "shift" not in leaf.state_dict()  # still non-persistent
    assert (leaf.offset, leaf.window) == (0.25, (2, 3))
    assert type(leaf.window) is tuple


def test_shared_layer_and_tied_weight_stay_shared(tmp_path):
    inputs = (torch.randn(2, 4, generator=torch.Generator().manual_seed(0)),)
    dag, loaded, inputs = _round_trip(SharedLayerModel(), inputs, tmp_path / "dag")
    _assert_same(dag, loaded, inputs)
    linears = [v.module for v in loaded.inner_vertices if isinstance(v.module, nn.Linear)]
    assert len(linears) == 3 and linears[0] is linears[1]
    assert linears[2].weight is linears[0].weight
    assert len(list(loaded.parameters())) == len(list(dag.parameters())) == 2


# --------------------------------------------------------------------------------- bad inputs
@pytest.fixture
def saved_lstm(tmp_path) -> Path:
    dag = dagprune.build_from_unstructured_module(SequenceModel().eval())
    return Path(dag.save(tmp_path / "saved"))


class Tripwire(nn.Module):
    """A module type that is neither allowed nor registered: records any attempt to create it."""

    created: list = []

    def __new__(cls, *args, **kwargs):
        cls.created.append(args)
        return super().__new__(cls)


@pytest.mark.parametrize("type_name", ["os.system", "builtins.eval", "subprocess.Popen",
                                       "collections.OrderedDict", "torch.nn.functional.relu",
                                       f"{__name__}.Tripwire"])
def test_structure_naming_a_disallowed_type_is_refused(saved_lstm, monkeypatch, type_name):
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    _edit_graph(saved_lstm, lambda d: _structural_vertex(d).update(type=type_name))
    with pytest.raises(SerializationError, match="not allowed or not registered") as caught:
        dagprune.load_dag(saved_lstm)
    assert type_name in str(caught.value)
    assert not called and not Tripwire.created


@pytest.mark.parametrize("attribute, value, message", [
    ("batch_first", {"function": "os.system"},
     "attribute 'batch_first': unknown function 'os.system'"),
    ("batch_first", {"class": "subprocess.Popen"}, "class 'subprocess.Popen' is not allowed"),
    ("batch_first", {"enum": ["signal.Signals", "SIGKILL"]}, "enum member"),
    ("batch_first", {"own_tensor": "nowhere"}, "not one of the module's parameters or buffers"),
    ("_parameters", 1, "clashes with nn.Module state"),
], ids=["function", "class", "enum", "tensor-reference", "internal-name"])
def test_structure_with_a_bad_attribute_is_refused(saved_lstm, attribute, value, message):
    _edit_graph(saved_lstm, lambda d: _structural_vertex(d)["structure"]["attributes"].update(
        {attribute: value}))
    with pytest.raises(SerializationError, match=message):
        dagprune.load_dag(saved_lstm)


def test_malformed_structure_is_refused(saved_lstm):
    def edit(document):
        _structural_vertex(document)["structure"]["parameters"][0][1]["shape"] = [-1, "x"]
    _edit_graph(saved_lstm, edit)
    with pytest.raises(SerializationError, match="malformed tensor description"):
        dagprune.load_dag(saved_lstm)


class _Opaque:
    """An object a saved DAG cannot store."""


def test_unsupported_attribute_is_named_at_save_time_and_nothing_is_written(tmp_path):
    leaf = ShiftedScale(3, offset=0.5, window=(1,))
    leaf.helper = _Opaque()
    dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Linear(3, 3), leaf).eval())
    with pytest.raises(SerializationError, match=r"attribute 'helper' of module '1' .*_Opaque.*"
                                                 r"register_module_serializer"):
        dag.save(tmp_path / "dag")
    assert list(tmp_path.iterdir()) == []
