"""Saving and loading lose nothing and fail cleanly.

Saving never deletes what it did not write; a save over a previous one is atomic (a complete
DAG loads from the path at every instant, a failure leaves no staging files) and files follow the
umask. Loading checks sizes before it allocates, honours ``map_location``, and turns every
corruption into a ``SerializationError`` that names the field and the vertex.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import dagprune
from dagprune.errors import SerializationError
from dagprune.save_directory import file_sha256
from memory_limit import allocation_limit, is_allocation_failure
from test_io_fuzz import SequenceModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOAD_MEMORY_BOUND = 256 << 20  # far below the 1 GiB a 16384 x 16384 float tensor takes
HUGE_SHAPE = [16384, 16384]
FILESYSTEM_CHANGES = ("replace", "rename", "unlink", "rmdir")


# --------------------------------------------------------------------------------- models
class TokenModel(nn.Module):
    """A class token (a parameter op) concatenated to the input, then a linear layer."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1))


MODELS = {  # name: (factory, example input shape)
    "token": (TokenModel, (2, 3, 4)),
    "sequence": (SequenceModel, (2, 5, 3)),
    "conv": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.Flatten(), nn.Linear(4 * 4 * 4, 2)), (2, 3, 6, 6)),
}


def _dag(name: str = "conv", seed: int = 0) -> dagprune.DagModule:
    torch.manual_seed(seed)
    return dagprune.build_from_unstructured_module(MODELS[name][0]().eval())


def _output(dag: nn.Module, name: str = "conv") -> torch.Tensor:
    example = torch.randn(*MODELS[name][1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return dag(example)


def _edit_graph(path: Path, edit) -> None:
    document = json.loads((path / "graph.json").read_text())
    edit(document)
    (path / "graph.json").write_text(json.dumps(document))


def _module_of(document: dict, vertex_name: str) -> dict:
    return next(v["module"] for v in document["graph"]["vertices"] if v["name"] == vertex_name)


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _with_user_files(directory: Path) -> Path:
    (directory / "notes.txt").write_text("my notes")
    (directory / "runs").mkdir()
    (directory / "runs" / "log.txt").write_text("epoch 1")
    return directory


def _assert_user_files_kept(directory: Path) -> None:
    assert (directory / "notes.txt").read_text() == "my notes"
    assert (directory / "runs" / "log.txt").read_text() == "epoch 1"


# --------------------------------------------------------------------------------- other files
def test_saving_over_a_previous_save_keeps_the_users_other_files(tmp_path):
    target = Path(_dag(seed=0).save(tmp_path / "model"))
    _with_user_files(target)
    newer = _dag(seed=1)
    newer.save(target)
    _assert_user_files_kept(target)
    assert torch.equal(_output(dagprune.load_dag(target)), _output(newer))
    assert _listing(target) == ["graph.json", "notes.txt", "runs", "runs/log.txt",
                                "tensors.safetensors"]


def test_convert_saved_dag_with_save_keeps_the_users_other_files(tmp_path, capsys):
    from dagprune_algorithms.app.cli import main

    saved = _with_user_files(Path(_dag().save(tmp_path / "saved")))
    other = _with_user_files(Path(_dag(seed=1).save(tmp_path / "other")))
    for target in (saved, other):
        assert main(["convert", str(saved), "--input-size", "3", "6", "6", "--no-summary",
                     "--save", str(target)]) == 0
        assert "round trip: bit-exact" in capsys.readouterr().out
        _assert_user_files_kept(target)
    assert torch.equal(_output(dagprune.load_dag(other)), _output(_dag(seed=0)))


def test_saving_over_a_graph_file_of_another_program_is_refused(tmp_path):
    target = tmp_path / "plots"
    target.mkdir()
    (target / "graph.json").write_text('{"nodes": [1, 2]}')
    with pytest.raises(SerializationError, match="graph.json is not a dagprune graph; refusing"):
        _dag().save(target)
    assert (target / "graph.json").read_text() == '{"nodes": [1, 2]}'
    assert _listing(tmp_path) == ["plots", "plots/graph.json"]


# --------------------------------------------------------------------------------- atomicity
class FilesystemSnapshots:
    """Copies a watched directory before and after every rename or removal any code makes.

    A copy is listed in :attr:`snapshots` even where the directory was missing at that instant
    (the listed path then does not exist, and loading from it fails).
    """

    def __init__(self, monkeypatch):
        self.snapshots: list[Path] = []
        self._directory: Path | None = None
        self._into: Path | None = None
        self._copying = False
        for name in FILESYSTEM_CHANGES:
            monkeypatch.setattr(os, name, self._watching(getattr(os, name)))

    def watch(self, directory: Path, into: Path) -> None:
        into.mkdir()
        self._directory, self._into = directory, into

    def stop(self) -> list[Path]:
        self._directory = None
        return self.snapshots

    def _watching(self, change):
        def call(*args, **kwargs):
            self._snapshot()
            try:
                return change(*args, **kwargs)
            finally:
                self._snapshot()
        return call

    def _snapshot(self) -> None:
        if self._copying or self._directory is None:
            return
        self._copying = True
        try:
            copy = self._into / f"{len(self.snapshots):03d}"
            if self._directory.exists():
                shutil.copytree(self._directory, copy)
            self.snapshots.append(copy)
        finally:
            self._copying = False


def test_a_complete_dag_loads_at_every_instant_of_a_save(tmp_path, monkeypatch):
    target = _with_user_files(Path(_dag(seed=0).save(tmp_path / "model")))
    old_output, new_output = _output(_dag(seed=0)), _output(_dag(seed=1))
    watcher = FilesystemSnapshots(monkeypatch)
    watcher.watch(target, tmp_path / "snapshots")
    _dag(seed=1).save(target)
    snapshots = watcher.stop()
    assert len(snapshots) >= 6
    for snapshot in snapshots:
        loaded = _output(dagprune.load_dag(snapshot))  # raises if no complete DAG is there
        assert torch.equal(loaded, old_output) or torch.equal(loaded, new_output), snapshot
    assert torch.equal(_output(dagprune.load_dag(snapshots[-1])), new_output)
    _assert_user_files_kept(target)


def test_a_save_after_a_crash_at_any_instant_of_the_previous_one_succeeds(tmp_path, monkeypatch):
    target = Path(_dag(seed=0).save(tmp_path / "model"))
    watcher = FilesystemSnapshots(monkeypatch)
    watcher.watch(target, tmp_path / "snapshots")
    _dag(seed=1).save(target)
    newest = _dag(seed=2)
    for index, snapshot in enumerate(watcher.stop()):
        crashed = tmp_path / "crashed" / str(index)
        shutil.copytree(snapshot, crashed)
        _with_user_files(crashed)
        newest.save(crashed)
        assert torch.equal(_output(dagprune.load_dag(crashed)), _output(newest)), snapshot
        _assert_user_files_kept(crashed)


def _fail_replace_call(monkeypatch, failing_call: int) -> None:
    """Makes the ``failing_call``-th ``os.replace`` from now on raise an I/O error."""
    real_replace, calls = os.replace, []

    def replace(source, destination):
        calls.append(source)
        if len(calls) == failing_call:
            raise OSError("I/O error")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("failing_call", [1, 2])
def test_a_save_failing_before_its_commit_keeps_the_previous_dag_and_leaves_nothing(
        tmp_path, monkeypatch, failing_call):
    target = _with_user_files(Path(_dag(seed=0).save(tmp_path / "model")))
    before = _listing(tmp_path)
    _fail_replace_call(monkeypatch, failing_call)
    with pytest.raises(OSError, match="I/O error"):
        _dag(seed=1).save(target)
    monkeypatch.undo()
    assert _listing(tmp_path) == before
    assert torch.equal(_output(dagprune.load_dag(target)), _output(_dag(seed=0)))


def test_a_save_failing_after_its_commit_warns_and_keeps_the_new_dag(tmp_path, monkeypatch):
    target = Path(_dag(seed=0).save(tmp_path / "model"))
    _fail_replace_call(monkeypatch, 3)  # moving the committed tensors to tensors.safetensors
    with pytest.warns(RuntimeWarning, match="loads from tensors.[0-9a-f]{16}.safetensors"):
        _dag(seed=1).save(target)
    monkeypatch.undo()
    assert torch.equal(_output(dagprune.load_dag(target)), _output(_dag(seed=1)))
    _dag(seed=2).save(target)  # the next save tidies up
    assert _listing(target) == ["graph.json", "tensors.safetensors"]
    assert torch.equal(_output(dagprune.load_dag(target)), _output(_dag(seed=2)))


@pytest.mark.parametrize("interruption", [OSError("No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupt"])
@pytest.mark.parametrize("previous", [False, True], ids=["new-directory", "over-a-save"])
def test_an_interrupted_graph_write_leaves_no_staging_files(tmp_path, monkeypatch, interruption,
                                                            previous):
    target = tmp_path / "model"
    if previous:
        _dag(seed=0).save(target)
    before = _listing(tmp_path)

    def fail(*args, **kwargs):
        raise interruption

    monkeypatch.setattr(json, "dumps", fail)
    with pytest.raises(type(interruption)):
        _dag(seed=1).save(target)
    monkeypatch.undo()
    assert _listing(tmp_path) == before


@pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_and_directories_follow_the_umask(tmp_path, umask):
    target = tmp_path / "model"
    previous_umask = os.umask(umask)
    try:
        _dag(seed=0).save(target)
        modes = [stat.S_IMODE(p.stat().st_mode) for p in (target, target / "graph.json",
                                                         target / "tensors.safetensors")]
        _dag(seed=1).save(target)
        resaved = [stat.S_IMODE((target / name).stat().st_mode)
                   for name in ("graph.json", "tensors.safetensors")]
    finally:
        os.umask(previous_umask)
    assert modes == [0o777 & ~umask, 0o666 & ~umask, 0o666 & ~umask]
    assert resaved == [0o666 & ~umask] * 2


# --------------------------------------------------------------------------------- bounded loading
def _huge_linear(document):
    _module_of(document, "proj")["config"]["dict"].update(in_features=16384, out_features=16384)


def _huge_lstm_weight(document):
    _module_of(document, "lstm")["structure"]["parameters"][0][1]["shape"] = HUGE_SHAPE


def _huge_parameter_op(document):
    _module_of(document, "cls_token")["config"]["shape"] = HUGE_SHAPE


@pytest.mark.parametrize("model, edit", [("token", _huge_linear), ("sequence", _huge_lstm_weight),
                                         ("token", _huge_parameter_op)],
                         ids=["linear-config", "lstm-parameter", "parameter-op"])
def test_a_huge_shape_is_refused_before_anything_is_allocated(tmp_path, model, edit):
    path = Path(_dag(model).save(tmp_path / "model"))
    _edit_graph(path, edit)
    assert (path / "graph.json").stat().st_size < 8000
    with allocation_limit(LOAD_MEMORY_BOUND), pytest.raises(SerializationError) as caught:
        dagprune.load_dag(path)
    assert not is_allocation_failure(caught.value), caught.value
    assert "does not fit the graph" in str(caught.value) and "16384" in str(caught.value)


def test_a_constructor_looping_over_a_huge_argument_is_stopped(tmp_path):
    path = Path(_dag("sequence").save(tmp_path / "model"))

    def edit(document):
        module = _module_of(document, "lstm")
        del module["structure"]
        module["config"] = {"dict": {"input_size": 3, "hidden_size": 4, "num_layers": 10 ** 8,
                                     "batch_first": True}}

    _edit_graph(path, edit)
    started = time.perf_counter()
    with allocation_limit(LOAD_MEMORY_BOUND), \
            pytest.raises(SerializationError, match="tensor operations") as caught:
        dagprune.load_dag(path)
    assert "'lstm'" in str(caught.value) and time.perf_counter() - started < 30


# --------------------------------------------------------------------------------- corruption
def _write_deep_graph(path: Path, depth: int) -> None:
    """A graph whose getitem index is a list nested ``depth`` deep (written without recursion)."""
    document = json.loads((path / "graph.json").read_text())
    _module_of(document, "getitem")["config"]["args"]["tuple"][1] = "@DEEP@"
    text = json.dumps(document).replace('"@DEEP@"', "[" * depth + "0" + "]" * depth)
    (path / "graph.json").write_text(text)


CORRUPTIONS = {  # id: (model, edit of the document, words the message must hold)
    "negative-dimension": ("token", lambda d: _module_of(d, "cls_token")["config"].update(
        shape=[-1, 4]), ["'cls_token'", "negative"]),
    "int64-trainable": ("token", lambda d: _module_of(d, "cls_token")["config"].update(
        dtype="torch.int64"), ["'cls_token'"]),
    "float64-parameter-op": ("token", lambda d: _module_of(d, "cls_token")["config"].update(
        dtype="torch.float64"), ["cls_token.value", "float64"]),
    "float16-structure": ("sequence", lambda d: _module_of(d, "lstm")["structure"]["parameters"]
                          [0][1].update(dtype="torch.float16"), ["weight_ih_l0", "float16"]),
    "huge-int-attribute": ("sequence", lambda d: _module_of(d, "lstm")["structure"]["attributes"]
                           .update(hidden_size=10 ** 300), ["hidden_size", "'lstm'", "64-bit"]),
    "huge-int-argument": ("sequence", lambda d: _module_of(d, "getitem")["config"]["args"]
                          ["tuple"].__setitem__(1, 10 ** 300), ["args.tuple[1]", "'getitem'"]),
    "missing-graph": ("conv", lambda d: d.pop("graph"), ["field 'graph' is missing"]),
    "missing-vertices": ("conv", lambda d: d["graph"].pop("vertices"),
                         ["graph.vertices", "missing"]),
    "training-not-a-bool": ("conv", lambda d: d.update(training="no"),
                            ["field 'training' must be true or false, got 'no'"]),
    "training-an-int": ("conv", lambda d: d.update(training=1), ["'training'"]),
    "predecessors-not-a-list": ("conv", lambda d: d["graph"]["vertices"][1].update(
        predecessors="_0"), ["predecessors", "'_1'"]),
    "qualified-name-a-number": ("conv", lambda d: d["graph"]["vertices"][1].update(
        qualified_name=3), ["qualified_name", "'_1'"]),
    "bias-a-string": ("conv", lambda d: _module_of(d, "_4")["config"]["dict"].update(bias="no"),
                      ["'_4'", "'bias'"]),
    "trainable-a-string": ("token", lambda d: _module_of(d, "cls_token")["config"].update(
        trainable="no"), ["'cls_token'", "'trainable'"]),
    "requires-grad-a-string": ("sequence", lambda d: _module_of(d, "lstm")["structure"]
                               ["parameters"][0][1].update(requires_grad="no"),
                               ["'lstm'", "requires_grad"]),
    "shared-unknown-path": ("conv", lambda d: d.update(shared={"modules": [
        ["vertex_modules._0", "vertex_modules.nowhere"]]}), ["'shared'"]),
    "shared-module-of-another-type": ("sequence", lambda d: d.update(shared={"modules": [
        ["vertex_modules.lstm", "vertex_modules.head"]]}), ["'shared'", "not a LSTM"]),
    "unknown-kind": ("conv", lambda d: _module_of(d, "_2").update(kind="evil"),
                     ["'_2'", "kind"]),
    "output-undefined": ("conv", lambda d: d["graph"].update(outputs=["nowhere"]), ["outputs"]),
    "input-reference-past-the-inputs": ("conv", lambda d: d["graph"].update(
        output_structure={"input": 5}), ["malformed DAG"]),
    "vertex-name-with-a-dot": ("conv", lambda d: d["graph"]["vertices"][4].update(name="a.b") or
                               d["graph"].update(outputs=["a.b"]), ["'a.b'"]),
    "sha256-not-hex": ("conv", lambda d: d.update(tensors_sha256="../../etc/passwd"),
                       ["tensors_sha256"]),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_every_corruption_is_a_serialization_error_naming_the_field(tmp_path, case):
    model, edit, words = CORRUPTIONS[case]
    path = Path(_dag(model).save(tmp_path / "model"))
    _edit_graph(path, edit)
    with pytest.raises(SerializationError) as caught:
        dagprune.load_dag(path)
    for word in words:
        assert word in str(caught.value), str(caught.value)


@pytest.mark.parametrize("depth", [120, 900, 5000])
def test_deep_nesting_is_a_serialization_error(tmp_path, depth):
    path = Path(_dag("sequence").save(tmp_path / "model"))
    _write_deep_graph(path, depth)
    with pytest.raises(SerializationError, match="nests .*deep"):
        dagprune.load_dag(path)


def test_a_300_digit_integer_is_refused_wherever_it_is(tmp_path):
    path = Path(_dag("token").save(tmp_path / "model"))
    _edit_graph(path, lambda d: _module_of(d, "expand")["config"]["args"]["tuple"].__setitem__(
        2, -10 ** 299))
    field = r"graph.vertices\[3\].module.config.args.tuple\[2\]' \(vertex 'expand'\)"
    with pytest.raises(SerializationError, match=field + " holds the integer -<an integer of"):
        dagprune.load_dag(path)


def _rewrite_tensor_header(path: Path, edit) -> None:
    """Edits the JSON header of the tensor file and records the new digest in the graph."""
    tensor_file = path / "tensors.safetensors"
    data = tensor_file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    tensor_file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length:])
    _edit_graph(path, lambda d: d.update(tensors_sha256=file_sha256(tensor_file)))


def test_a_tensor_of_another_kind_of_dtype_is_refused(tmp_path):
    path = Path(_dag("token").save(tmp_path / "model"))
    _rewrite_tensor_header(path, lambda h: h["vertex_modules.proj.weight"].update(dtype="I32"))
    with pytest.raises(SerializationError, match=r"wrong dtype \['vertex_modules.proj.weight "
                                                 r"\(graph torch.float32, file torch.int32\)'\]"):
        dagprune.load_dag(path)


def test_a_model_saved_in_half_precision_loads_in_half_precision(tmp_path):
    dag = _dag("conv").half()
    loaded = dagprune.load_dag(dag.save(tmp_path / "model"))
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}


# --------------------------------------------------------------------------------- map_location
@pytest.mark.parametrize("map_location", ["meta", torch.device("meta")], ids=["string", "device"])
def test_loading_on_the_meta_device_gives_the_structure_without_values(tmp_path, map_location):
    dag = _dag("sequence")
    skeleton = dagprune.load_dag(dag.save(tmp_path / "model"), map_location=map_location)
    assert {t.device.type for t in [*skeleton.parameters(), *skeleton.buffers()]} == {"meta"}
    assert [(n, p.shape, p.dtype) for n, p in skeleton.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in dag.named_parameters()]
    output = skeleton(torch.zeros(*MODELS["sequence"][1], device="meta"))
    assert output.shape == _output(dag, "sequence").shape


@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu"), "cpu:0"])
def test_loading_on_the_cpu_by_any_spelling(tmp_path, map_location):
    dag = _dag("token")
    loaded = dagprune.load_dag(dag.save(tmp_path / "model"), map_location=map_location)
    assert torch.equal(_output(loaded, "token"), _output(dag, "token"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_loading_on_cuda_without_cuda_is_refused(tmp_path):
    path = _dag().save(tmp_path / "model")
    with pytest.raises(SerializationError, match=r"cannot load onto cuda.*map_location='cpu'"):
        dagprune.load_dag(path, map_location="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", sorted(MODELS))
def test_loading_on_cuda_puts_every_tensor_there(tmp_path, model):
    dag = _dag(model)
    loaded = dagprune.load_dag(dag.save(tmp_path / "model"), map_location="cuda")
    assert {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]} == {"cuda"}
    for name, tensor in dag.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].cpu(), tensor), name
    example = torch.randn(*MODELS[model][1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # cuDNN may compute in TF32: close, not bit-exact
        torch.testing.assert_close(loaded(example.cuda()).cpu(), dag(example), rtol=1e-2,
                                   atol=1e-2)


def test_a_map_location_that_is_no_device_is_refused(tmp_path):
    path = _dag().save(tmp_path / "model")
    with pytest.raises(SerializationError, match="map_location='gpu0' is not a device"):
        dagprune.load_dag(path, map_location="gpu0")


def test_format_version_1_saves_still_load(tmp_path):
    dag = _dag("conv")  # no non-persistent buffers or sharing: its tensor file is a version 1 one
    path = Path(dag.save(tmp_path / "model"))
    _edit_graph(path, lambda d: d.update(version=1) or d.pop("shared"))
    assert torch.equal(_output(dagprune.load_dag(path)), _output(dag))


def test_old_saves_without_the_optional_fields_still_load(tmp_path):
    dag = _dag("conv")
    path = Path(dag.save(tmp_path / "model"))
    _edit_graph(path, lambda d: [d.pop(key) for key in ("shared", "torch_version", "training")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_output(dagprune.load_dag(path)), _output(dag))
