"""Layers reparametrized with torch.nn.utils.parametrize: converted, saved, pruned and saved
again exactly; what cannot be saved or converted is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations, parametrize

import dagprune
from dagprune.errors import ConversionError, SerializationError
from dagprune_algorithms.pruning import ChannelPruning
from gate_states import assert_removal_matches_gates, random_gate_states

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Reparametrized(nn.Module):
    """A 1-d conv stack (as audio models build them) and a linear head, each reparametrized."""

    def __init__(self, kind: str):
        super().__init__()
        self.stem = nn.Conv1d(4, 16, 1)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.mix = nn.Conv1d(16, 12, 3, padding=1)
        self.hidden = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)
        if kind == "weight_norm":  # wav2vec2's position conv normalises over the kernel axis
            parametrizations.weight_norm(self.conv, dim=2)
            parametrizations.weight_norm(self.mix)
        elif kind == "spectral_norm":
            parametrizations.spectral_norm(self.conv)
            parametrizations.spectral_norm(self.mix)
        if kind == "orthogonal":
            parametrizations.orthogonal(self.hidden)

    def forward(self, x):
        y = F.gelu(self.mix(F.gelu(self.conv(self.stem(x)))))
        return self.head(torch.tanh(self.hidden(y.mean(-1))))


def _save_and_load(dag, tmp_path, name):
    dag.save(tmp_path / name)
    return dagprune.load_dag(tmp_path / name).eval()


def _assert_same_outputs_and_state(expected, loaded, x):
    with torch.no_grad():
        assert torch.equal(expected(x), loaded(x))
    expected_state, loaded_state = expected.state_dict(), loaded.state_dict()
    assert expected_state.keys() == loaded_state.keys()
    assert all(torch.equal(expected_state[key], loaded_state[key]) for key in expected_state)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "orthogonal"])
def test_reparametrized_layers_convert_save_prune_and_save_again_exactly(kind, tmp_path):
    torch.manual_seed(0)
    model = _Reparametrized(kind).eval()
    x = torch.randn(2, 4, 20)
    dag = dagprune.build_from_unstructured_module(model).eval()
    with torch.no_grad():
        assert torch.equal(model(x), dag(x))
    _assert_same_outputs_and_state(dag, _save_and_load(dag, tmp_path, "dag"), x)

    pruning = ChannelPruning(dag, (4, 20), 0.5, 10)
    gated = pruning.prepare_for_pruning()
    assert pruning.prunable_proportion > 0.9
    for index, _ in enumerate(random_gate_states(pruning, seed=3, count=2)):
        slim = assert_removal_matches_gates(pruning, gated, (x,))
        _assert_same_outputs_and_state(slim, _save_and_load(slim, tmp_path, f"slim{index}"), x)
    conv = next(v.module for v in slim.inner_vertices if v.name == "conv")
    # weight norm fits any weight again and is kept; spectral norm would divide the smaller
    # weight by another norm, so the slim layer holds the weight the gated model used
    assert parametrize.is_parametrized(conv) == (kind == "weight_norm")


def test_weight_norm_is_refitted_to_the_slim_weight_and_still_trains_as_magnitude_and_direction():
    torch.manual_seed(0)
    dag = dagprune.build_from_unstructured_module(_Reparametrized("weight_norm")).eval()
    pruning = ChannelPruning(dag, (4, 20), 0.5, 10)
    pruning.prepare_for_pruning()
    next(iter(random_gate_states(pruning, seed=1, count=1)))
    slim = pruning.remove_channels()
    mix = next(v.module for v in slim.inner_vertices if v.name == "mix")
    magnitude, direction = mix.parametrizations.weight.original0, mix.parametrizations.weight.original1
    assert magnitude.shape == (mix.out_channels, 1, 1) and direction.shape == mix.weight.shape
    assert magnitude.requires_grad and direction.requires_grad


class _Clamped(nn.Module):
    """A parametrization of the user's own, not registered with dagprune."""

    def forward(self, weight):
        return weight.clamp(-0.1, 0.1)


def test_an_unregistered_parametrization_is_a_clear_error_on_saving(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    parametrize.register_parametrization(model[0], "weight", _Clamped())
    dag = dagprune.build_from_unstructured_module(model)
    with pytest.raises(SerializationError, match=r"'0\.parametrizations\.weight\.0'.*register"):
        dag.save(tmp_path / "dag")
    assert not (tmp_path / "dag").exists()


def test_a_leaf_with_a_forward_hook_is_not_saved_without_it(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    model[0].register_forward_hook(lambda module, inputs, output: output * 2)
    dag = dagprune.build_from_unstructured_module(model)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(model(x), dag(x))  # the hook runs in the DAG
    with pytest.raises(SerializationError, match="'0'.*_forward_hooks.*remove the hooks"):
        dag.save(tmp_path / "dag")


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("deprecated", ["weight_norm", "spectral_norm"])
def test_the_deprecated_hook_reparametrizations_are_refused_with_their_replacement(deprecated):
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 2, 3))
    getattr(torch.nn.utils, deprecated)(model[2])
    with pytest.raises(ConversionError, match=rf"'2' \(Conv1d\).*parametrizations\.{deprecated}"):
        dagprune.build_from_unstructured_module(model)


def _parametrized_entry(description):
    if isinstance(description, dict):
        if description.get("type") == "parametrized":
            return description
        description = list(description.values())
    for item in description if isinstance(description, list) else []:
        found = _parametrized_entry(item)
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("corrupt", [
    lambda entry: entry.pop("base"),
    lambda entry: entry.__setitem__("parametrizations", []),
    lambda entry: entry["parametrizations"][0][1].__setitem__("unsafe", "yes"),
    lambda entry: entry["parametrizations"][0][1]["modules"][0].__setitem__("type", "os.system"),
    lambda entry: entry["parametrizations"][0].__setitem__(0, "no_such_tensor"),
], ids=["no-base", "no-parametrizations", "unsafe-not-bool", "foreign-type", "unknown-tensor"])
def test_a_corrupt_parametrized_layer_is_refused_on_loading(corrupt, tmp_path):
    dagprune.build_from_unstructured_module(_Reparametrized("weight_norm")).save(tmp_path / "dag")
    graph_file = tmp_path / "dag" / "graph.json"
    graph = json.loads(graph_file.read_text())
    corrupt(_parametrized_entry(graph))
    graph_file.write_text(json.dumps(graph))
    with pytest.raises(SerializationError, match="vertex 'conv'"):
        dagprune.load_dag(tmp_path / "dag")
