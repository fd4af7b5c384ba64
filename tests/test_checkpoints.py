"""Trained weights in (:mod:`dagprune.checkpoints`): every checkpoint format loads the same
weights, and every bad checkpoint is one clear :class:`CheckpointError` (or, for a directory,
:class:`SerializationError`) naming the file, what does not fit and what to do."""

from __future__ import annotations

import argparse
import io

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import dagprune
from dagprune.errors import CheckpointError, SerializationError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def _model(classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, classes))


def _trained_state() -> dict:
    state = _model(seed=1).state_dict()
    state["1.running_mean"] = torch.rand(8)  # statistics count too
    return state


def _assert_holds(model: nn.Module, state: dict) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


FORMATS = {
    "state_dict": lambda state: state,
    "timm_state_dict": lambda state: {"epoch": 3, "arch": "x", "state_dict": state, "optimizer": {}},
    "model_entry": lambda state: {"model": state, "step": 10},
    "ema_only": lambda state: {"state_dict_ema": state, "metric": 0.5},
    "ddp_prefix": lambda state: {f"module.{key}": value for key, value in state.items()},
    "ddp_prefix_in_entry": lambda state: {"state_dict": {f"module.{key}": value for key, value in state.items()}},
}


@pytest.mark.parametrize("layout", sorted(FORMATS))
def test_torch_checkpoint_layouts_load_the_same_weights(tmp_path, layout):
    state = _trained_state()
    path = tmp_path / "weights.pth"
    torch.save(FORMATS[layout](state), path)
    model = _model()
    assert dagprune.load_weights(model, path) is model
    _assert_holds(model, state)


def test_safetensors_state_dict_loads_and_the_suffix_does_not_matter(tmp_path):
    state = _trained_state()
    for name in ("weights.safetensors", "weights.bin"):
        save_file({f"module.{key}": value for key, value in state.items()}, str(tmp_path / name))
        model = _model()
        dagprune.load_weights(model, tmp_path / name)
        _assert_holds(model, state)


def test_use_ema_prefers_the_ema_weights(tmp_path):
    state, ema = _trained_state(), _model(seed=2).state_dict()
    torch.save({"state_dict": state, "state_dict_ema": ema}, tmp_path / "c.pt")
    _assert_holds(dagprune.load_weights(_model(), tmp_path / "c.pt"), state)
    _assert_holds(dagprune.load_weights(_model(), tmp_path / "c.pt", use_ema=True), ema)


def test_a_saved_dag_directory_is_used_as_it_is(tmp_path):
    trained = _model(seed=1).eval()
    dag = dagprune.build_from_unstructured_module(trained)
    path = dag.save(tmp_path / "dag")
    loaded = dagprune.load_weights(_model(), path)
    assert isinstance(loaded, dagprune.DagModule)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), dag(x))


def test_missing_batch_norm_counters_are_tolerated(tmp_path):
    state = {key: value for key, value in _trained_state().items() if not key.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pt")
    model = _model()
    dagprune.load_weights(model, tmp_path / "old.pt")
    assert torch.equal(model.state_dict()["0.weight"], state["0.weight"])


# ------------------------------------------------------------------------------- errors
def _save(path, content) -> str:
    torch.save(content, path)
    return str(path)


def _renamed(state: dict, count: int) -> dict:
    """``state`` with its first ``count`` keys renamed (missing in the model's eyes: unexpected)."""
    return {(f"extra.{key}" if index < count else key): value for index, (key, value) in enumerate(state.items())}


BAD_CHECKPOINTS = {
    "missing_file": (lambda tmp: str(tmp / "nope.pt"), ["nope.pt does not exist"]),
    "random_bytes": (lambda tmp: _write(tmp / "junk.pt", b"not a checkpoint " * 40),
                     ["is neither a safetensors nor a readable torch file", "torch.save(model.state_dict()"]),
    "empty_file": (lambda tmp: _write(tmp / "empty.pt", b""), ["empty.pt is empty"]),
    "truncated_torch_file": (lambda tmp: _write(tmp / "cut.pt", _torch_bytes()[:300]),
                             ["is neither a safetensors nor a readable torch file"]),
    "truncated_safetensors": (lambda tmp: _truncated_safetensors(tmp),
                              ["looks like safetensors but cannot be read", "truncated or corrupt"]),
    "pickled_objects": (lambda tmp: _save(tmp / "args.pt", {"state_dict": _trained_state(),
                                                            "args": argparse.Namespace(lr=0.1)}),
                        ["refuses to unpickle", "argparse.Namespace", "torch.save(checkpoint['state_dict']"]),
    "no_state_dict": (lambda tmp: _save(tmp / "meta.pt", {"epoch": 3, "arch": "resnet"}),
                      ["holds no state dict", "'epoch', 'arch' (2) are not tensors", "'state_dict' / 'model'"]),
    "not_a_dict": (lambda tmp: _save(tmp / "list.pt", [torch.ones(1)]), ["holds a list, not a state dict"]),
    "missing_and_unexpected": (lambda tmp: _save(tmp / "renamed.pt", _renamed(_trained_state(), 7)),
                               ["missing keys '0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean' "
                                "and 1 more (6)",
                                "unexpected keys 'extra.0.weight'", "and 2 more (7)",
                                "same architecture with the same settings"]),
    "shape_mismatch": (lambda tmp: _save(tmp / "classes.pt", _model(classes=10).state_dict()),
                       ["shape mismatches 5.weight: model (4, 8), checkpoint (10, 8); "
                        "5.bias: model (4,), checkpoint (10,) (2)", "number of classes"]),
    "prefixed": (lambda tmp: _save(tmp / "backbone.pt", {f"backbone.{k}": v for k, v in _trained_state().items()}),
                 ["carry the prefix 'backbone.'"]),
}


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _torch_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(_trained_state(), buffer)
    return buffer.getvalue()


def _truncated_safetensors(tmp) -> str:
    save_file(_trained_state(), str(tmp / "full.safetensors"))
    data = (tmp / "full.safetensors").read_bytes()
    return _write(tmp / "cut.safetensors", data[:len(data) // 2])


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoints_raise_one_clear_error(tmp_path, case):
    make, fragments = BAD_CHECKPOINTS[case]
    path = make(tmp_path)
    model = _model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError) as raised:
        dagprune.load_weights(model, path)
    message = str(raised.value)
    assert path in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    _assert_holds(model, before)  # nothing was half loaded


def test_a_directory_that_is_no_saved_dag_is_a_serialization_error(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(SerializationError):
        dagprune.load_weights(_model(), tmp_path / "folder")
