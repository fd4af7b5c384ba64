"""Saving and loading: bit-exact round trips, no need for the model's source, clear errors.

A saved DAG is ``graph.json`` + ``tensors.safetensors``. Loading must reproduce the DAG's outputs
bit for bit, must not need (or import) the classes of the original model, must refuse corrupt,
truncated or foreign files and anything outside the allowlist of functions and layer types with
a ``SerializationError`` that says what is wrong, and saving must be atomic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import dagprune
from dagprune.errors import SerializationError
from equivalence import assert_outputs_equal, flatten_outputs
from random_dags import random_dag_model
from timm_families import create_timm_model, timm_params
from zoo import ZOO, make_example_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]
RANDOM_DAG_SEEDS = range(5)
ALLOWED_MODULE_PACKAGES = ("torch", "dagprune")


def _convert(model: nn.Module) -> dagprune.DagModule:
    return dagprune.build_from_unstructured_module(model.eval())


def _assert_round_trip_is_bit_exact(dag: dagprune.DagModule, inputs: tuple, path: Path) -> None:
    loaded = dagprune.load_dag(dag.save(path))
    assert loaded.training == dag.training
    assert [v.name for v in loaded.inner_vertices] == [v.name for v in dag.inner_vertices]
    expected_state, loaded_state = dag.state_dict(), loaded.state_dict()
    assert list(loaded_state) == list(expected_state)
    for name, tensor in expected_state.items():
        assert loaded_state[name].dtype == tensor.dtype, name
        assert torch.equal(loaded_state[name], tensor), name
    foreign = {type(m).__module__ for m in loaded.modules()
               if type(m).__module__.split(".")[0] not in ALLOWED_MODULE_PACKAGES}
    assert not foreign, f"loaded DAG holds classes from {foreign}"
    with torch.no_grad():
        assert_outputs_equal(dag(*inputs), loaded(*inputs))


# --------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_round_trip_is_bit_exact(name, tmp_path):
    entry = ZOO[name]
    _assert_round_trip_is_bit_exact(_convert(entry.factory()), make_example_inputs(entry),
                                    tmp_path / name)


@pytest.mark.parametrize("seed", RANDOM_DAG_SEEDS)
def test_random_dag_round_trip_is_bit_exact(seed, tmp_path):
    model, input_shape = random_dag_model(seed)
    inputs = (torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(seed)),)
    _assert_round_trip_is_bit_exact(_convert(model), inputs, tmp_path / "dag")


@pytest.mark.parametrize("case", timm_params())
def test_timm_family_round_trip_is_bit_exact(case, tmp_path):
    dag = _convert(create_timm_model(case))
    inputs = (torch.randn(2, *case.input_size, generator=torch.Generator().manual_seed(0)),)
    _assert_round_trip_is_bit_exact(dag, inputs, tmp_path / case.name)


def test_train_mode_round_trip_keeps_mode_and_outputs(tmp_path):
    entry = ZOO["squeeze_excite"]
    dag = _convert(entry.factory()).train()
    loaded = dagprune.load_dag(dag.save(tmp_path / "dag"))
    assert loaded.training
    inputs = make_example_inputs(entry)
    with torch.no_grad():
        assert_outputs_equal(dag(*inputs), loaded(*inputs))
    assert_outputs_equal(tuple(dag.buffers()), tuple(loaded.buffers()))  # same statistics update


_LOAD_WITHOUT_SOURCE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])  # the repository, for dagprune only
    import torch, safetensors.torch, dagprune
    results = {}
    for name in json.loads(sys.argv[3]):
        saved = safetensors.torch.load_file(f"{sys.argv[2]}/{name}.reference.safetensors")
        inputs = [saved[f"input{i}"] for i in range(sum(k.startswith("input") for k in saved))]
        dag = dagprune.load_dag(f"{sys.argv[2]}/{name}")
        with torch.no_grad():
            outputs = dag(*inputs)
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        results[name] = {
            "equal": len(outputs) == sum(k.startswith("output") for k in saved) and all(
                torch.equal(out, saved[f"output{i}"]) for i, out in enumerate(outputs)),
            "classes": sorted({type(m).__module__ for m in dag.modules()}),
        }
    results["imported_test_modules"] = sorted(set(sys.modules) & {"zoo", "random_dags", "tests"})
    print(json.dumps(results))
""")


def test_saved_zoo_models_load_in_a_process_without_their_source(tmp_path):
    for name, entry in ZOO.items():
        dag = _convert(entry.factory())
        dag.save(tmp_path / name)
        inputs = make_example_inputs(entry)
        with torch.no_grad():
            outputs = flatten_outputs(dag(*inputs))
        reference = {f"input{i}": x for i, x in enumerate(inputs)}
        reference.update({f"output{i}": y.contiguous() for i, y in enumerate(outputs)})
        safetensors.torch.save_file(reference, str(tmp_path / f"{name}.reference.safetensors"))

    completed = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_SOURCE, str(REPO_ROOT), str(tmp_path),
         json.dumps(sorted(ZOO))],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results.pop("imported_test_modules") == []
    for name in ZOO:
        assert results[name]["equal"], f"{name}: outputs differ after loading in a fresh process"
        foreign = [m for m in results[name]["classes"]
                   if m.split(".")[0] not in ALLOWED_MODULE_PACKAGES]
        assert not foreign, f"{name}: loaded DAG holds classes from {foreign}"


# --------------------------------------------------------------------------------- bad inputs
@pytest.fixture
def saved_dag(tmp_path) -> Path:
    """A saved attention DAG (linear layers, reshapes, matmuls, softmax) to corrupt."""
    return Path(_convert(ZOO["attention_block"].factory()).save(tmp_path / "saved"))


def _edit_graph(path: Path, edit) -> None:
    document = json.loads((path / "graph.json").read_text())
    edit(document)
    (path / "graph.json").write_text(json.dumps(document))


def _first_vertex(document: dict, predicate) -> dict:
    return next(v for v in document["graph"]["vertices"] if predicate(v["module"]))


def _is_function_op(module: dict) -> bool:
    return module["kind"] == "op" and "function_name" in module["config"]


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(SerializationError, match="is not a saved dagprune DAG"):
        dagprune.load_dag(tmp_path / "does-not-exist")


def test_foreign_directory_is_reported(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(SerializationError, match="lacks graph.json"):
        dagprune.load_dag(tmp_path)


def test_missing_tensor_file_is_reported(saved_dag):
    (saved_dag / "tensors.safetensors").unlink()
    with pytest.raises(SerializationError, match="lacks tensors.safetensors"):
        dagprune.load_dag(saved_dag)


@pytest.mark.parametrize("content", [b"\x00\xff garbage {", b'{"format": "dagprune-dag", "ver'],
                         ids=["binary-garbage", "truncated"])
def test_corrupt_graph_file_is_reported(saved_dag, content):
    (saved_dag / "graph.json").write_bytes(content)
    with pytest.raises(SerializationError, match="graph.json is not valid JSON"):
        dagprune.load_dag(saved_dag)


@pytest.mark.parametrize("document, message", [
    ({"format": "keras", "graph": {}}, "is not a dagprune graph"),
    ([1, 2, 3], "is not a dagprune graph"),
    ({"format": "dagprune-dag", "version": 99}, "format version 99"),
], ids=["other-format", "not-an-object", "future-version"])
def test_foreign_graph_file_is_reported(saved_dag, document, message):
    (saved_dag / "graph.json").write_text(json.dumps(document))
    with pytest.raises(SerializationError, match=message):
        dagprune.load_dag(saved_dag)


def test_truncated_tensor_file_is_reported(saved_dag):
    tensor_file = saved_dag / "tensors.safetensors"
    tensor_file.write_bytes(tensor_file.read_bytes()[:-100])
    with pytest.raises(SerializationError, match="truncated, corrupt or from another save"):
        dagprune.load_dag(saved_dag)


def test_truncated_tensor_file_with_matching_checksum_is_reported(saved_dag):
    """Even a graph that vouches for the short file does not load it."""
    tensor_file = saved_dag / "tensors.safetensors"
    tensor_file.write_bytes(tensor_file.read_bytes()[:-100])
    from dagprune.io import _sha256
    _edit_graph(saved_dag, lambda d: d.update(tensors_sha256=_sha256(tensor_file)))
    with pytest.raises(SerializationError, match="tensors.safetensors cannot be read"):
        dagprune.load_dag(saved_dag)


def test_tensors_from_another_save_are_reported(saved_dag, tmp_path):
    other = _convert(ZOO["attention_block"].factory(seed=1)).save(tmp_path / "other")
    other_tensors = (Path(other) / "tensors.safetensors").read_bytes()
    (saved_dag / "tensors.safetensors").write_bytes(other_tensors)
    with pytest.raises(SerializationError, match="checksum differs"):
        dagprune.load_dag(saved_dag)


def test_unknown_op_type_is_reported(saved_dag):
    def edit(document):
        _first_vertex(document, lambda m: m["kind"] == "op")["module"]["type"] = "EvilOp"
    _edit_graph(saved_dag, edit)
    with pytest.raises(SerializationError,
                       match=r"cannot load vertex '\w+': unknown op type 'EvilOp'"):
        dagprune.load_dag(saved_dag)


@pytest.mark.parametrize("function", ["os.system", "torch.load", "builtins.eval",
                                      "subprocess.run", "Tensor.__reduce_ex__"])
def test_function_outside_the_allowlist_is_refused(saved_dag, monkeypatch, function):
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    monkeypatch.setattr(torch, "load", lambda *a, **k: called.append(a))

    def edit(document):
        _first_vertex(document, _is_function_op)["module"]["config"]["function_name"] = function
    _edit_graph(saved_dag, edit)
    with pytest.raises(SerializationError) as caught:
        dagprune.load_dag(saved_dag)
    assert function in str(caught.value) and "cannot load vertex" in str(caught.value)
    assert "unknown" in str(caught.value)
    assert not called


@pytest.mark.parametrize("type_name", ["subprocess.Popen", "os.system", "torch.nn.functional.relu",
                                       "collections.OrderedDict"])
def test_layer_type_outside_the_allowlist_is_refused(saved_dag, type_name):
    def edit(document):
        vertex = _first_vertex(document, lambda m: m["kind"] == "layer")
        vertex["module"]["type"] = type_name
    _edit_graph(saved_dag, edit)
    with pytest.raises(SerializationError, match="not allowed or not registered"):
        dagprune.load_dag(saved_dag)


def test_graph_that_does_not_fit_the_tensors_is_reported(saved_dag):
    def edit(document):
        vertex = _first_vertex(document, lambda m: m.get("type") == "torch.nn.Linear")
        vertex["module"]["config"]["dict"]["out_features"] += 1
    _edit_graph(saved_dag, edit)
    with pytest.raises(SerializationError, match="does not fit the graph"):
        dagprune.load_dag(saved_dag)


def test_vertex_reading_an_undefined_vertex_is_reported(saved_dag):
    def edit(document):
        document["graph"]["vertices"][1]["predecessors"] = ["nowhere"]
    _edit_graph(saved_dag, edit)
    with pytest.raises(SerializationError, match=r"reads undefined vertices \['nowhere'\]"):
        dagprune.load_dag(saved_dag)


def test_module_without_a_serializer_cannot_be_saved(tmp_path):
    class Custom(nn.Module):
        def forward(self, x):
            return x * 2

    model = nn.Sequential(nn.Linear(2, 2), Custom())
    dag = dagprune.build_from_unstructured_module(model, leaf_modules=[Custom])
    with pytest.raises(SerializationError, match="register_module_serializer"):
        dag.save(tmp_path / "dag")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------- saving safely
def _dag(seed: int = 0) -> dagprune.DagModule:
    return _convert(ZOO["resnet_basic_blocks"].factory(seed=seed))


def _output(dag: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return dag(*make_example_inputs(ZOO["resnet_basic_blocks"]))


def test_saving_over_a_previous_save_replaces_it(tmp_path):
    _dag(seed=0).save(tmp_path / "model")
    newer = _dag(seed=1)
    newer.save(tmp_path / "model")
    assert torch.equal(_output(dagprune.load_dag(tmp_path / "model")), _output(newer))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_saving_over_a_foreign_directory_is_refused(tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"\xff\xd8 not a model")
    with pytest.raises(SerializationError, match="is not a saved DAG; refusing to overwrite"):
        _dag().save(target)
    assert [p.name for p in target.iterdir()] == ["holiday.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]


def test_saving_over_a_file_is_refused(tmp_path):
    target = tmp_path / "model"
    target.write_text("keep me")
    with pytest.raises(SerializationError, match="refusing to overwrite"):
        _dag().save(target)
    assert target.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_interrupted_tensor_write_keeps_the_previous_save(tmp_path, monkeypatch):
    previous = _dag(seed=0)
    previous.save(tmp_path / "model")

    def write_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 64)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        _dag(seed=1).save(tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directory left
    assert torch.equal(_output(dagprune.load_dag(tmp_path / "model")), _output(previous))


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _dag().save(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_failed_final_rename_keeps_the_previous_save(tmp_path, monkeypatch):
    previous = _dag(seed=0)
    previous.save(tmp_path / "model")
    real_replace, calls = os.replace, []

    def replace_failing_second_time(source, target):
        calls.append((source, target))
        if len(calls) == 2:  # first call moves the old save aside, second moves the new one in
            raise OSError("I/O error")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_failing_second_time)
    with pytest.raises(OSError, match="I/O error"):
        _dag(seed=1).save(tmp_path / "model")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert torch.equal(_output(dagprune.load_dag(tmp_path / "model")), _output(previous))
