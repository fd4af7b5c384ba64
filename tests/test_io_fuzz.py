"""Property test: a corrupted save loads as a ``SerializationError`` or as a DAG that works.

Real saves of small models (a residual conv net, a transformer-style block with a parameter op,
an LSTM and a ``nn.TransformerEncoderLayer``, both saved by structure) are corrupted the ways
disks, editors and attackers do: fields of ``graph.json`` deleted, renamed, duplicated or
replaced by values of the wrong type, huge or negative integers, unknown names and deep
nesting; the tensor file truncated, its bytes flipped, its header's dtypes, shapes and offsets
changed (with the graph's checksum updated half of the time, so that the checks behind it run).

Loading must raise :class:`~dagprune.errors.SerializationError` or return a DAG that passes
``lint()`` and runs on the model's example input, and it must never allocate more than
:data:`LOAD_MEMORY_BOUND`. One exception to "runs": a change inside a layer's or op's constant
arguments (``config``, ``args``, ``attributes``, ...), its predecessors or the training flag can
describe another valid model that does not fit the example input (``Flatten(start_dim=7)``);
the file format cannot tell, so such a DAG may raise when run, within the memory bound.

The examples are derandomized: every run draws the same ones.
"""

from __future__ import annotations

import copy
import hashlib
import json
import resource
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dagprune
from dagprune.errors import SerializationError
from memory_limit import allocation_limit, is_allocation_failure

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOAD_MEMORY_BOUND = 256 << 20
RUN_MEMORY_BOUND = 256 << 20
RSS_GROWTH_BOUND = 768 << 20  # peak resident memory of the whole property run, over its start
GRAPH_EXAMPLES = 800
TENSOR_FILE_EXAMPLES = 400
# Keys under which a changed value can still describe a valid (different) model.
CONSTANT_KEYS = {"config", "args", "kwargs", "attributes", "output_structure", "default",
                 "predecessors", "training"}
DEEP = "@DEEP@"
HUGE_SHAPES = [[16384, 16384], [1 << 40], [1 << 31, 1 << 31]]
REPLACEMENTS = [
    10 ** 300, -10 ** 300, 1 << 63, -(1 << 63) - 1, 1 << 62, 1 << 40, 16384, 1 << 31, -1, -7, 0,
    1, "x", "", None, True, False, 1.5, -0.0, 1e308, [], {}, [1, 2], {"tuple": "abc"},
    {"input": 99}, {"dtype": "torch.int64"}, {"own_tensor": "nowhere"}, {"function": "os.system"},
    {"class": "subprocess.Popen"}, {"enum": ["signal.Signals", "SIGKILL"]}, "EvilOp",
    "os.system", "torch.nn.Evil", "subprocess.Popen", "torch.float64", "torch.int64",
    "timm.layers.Nothing", *HUGE_SHAPES, DEEP,
]
NEW_DTYPES = ["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "XX"]


# --------------------------------------------------------------------------------- models
class ResidualConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.conv(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class AttentionBlock(nn.Module):
    """Position embedding (a parameter op), pre-norm attention written out, and an MLP."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.position = nn.Parameter(torch.randn(1, 5, dim) * 0.1)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.position
        batch, tokens, dim = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention = (q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.mlp(x)


class SequenceModel(nn.Module):
    """An LSTM (saved by structure) read by a linear head."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        output, _ = self.lstm(x)
        return self.head(output[:, -1])


class EncoderModel(nn.Module):
    """A linear embedding read by ``nn.TransformerEncoderLayer`` (saved by structure)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.encoder(self.embed(x))


MODELS = {  # name: (factory, example input shape)
    "conv": (ResidualConvNet, (2, 3, 8, 8)),
    "attention": (AttentionBlock, (2, 5, 8)),
    "lstm": (SequenceModel, (2, 5, 3)),
    "encoder": (EncoderModel, (2, 5, 4)),
}


class SavedModel:
    """One model's save: the graph document, the tensor file's bytes and an example input."""

    def __init__(self, name: str, directory: Path):
        factory, input_shape = MODELS[name]
        torch.manual_seed(0)
        dag = dagprune.build_from_unstructured_module(factory().eval())
        path = Path(dag.save(directory / name))
        self.document = json.loads((path / "graph.json").read_text())
        self.tensor_bytes = (path / "tensors.safetensors").read_bytes()
        self.example = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.output = dag(self.example)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, SavedModel]:
    directory = tmp_path_factory.mktemp("saved")
    return {name: SavedModel(name, directory) for name in MODELS}


# --------------------------------------------------------------------------------- corrupting
def _field_paths(value, path=()) -> list[tuple]:
    """Every path into the JSON ``value`` (its root excluded), in a fixed order."""
    paths = []
    children = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        paths.append((*path, key))
        paths.extend(_field_paths(child, (*path, key)))
    return paths


def _parent(document, path):
    for key in path[:-1]:
        document = document[key]
    return document


@st.composite
def graph_corruptions(draw, document: dict):
    """A corrupted copy of ``document``, the changes made (for failure messages), and whether
    one of them changed a constant (after which the DAG may describe another valid model)."""
    document = copy.deepcopy(document)
    choose = draw(st.randoms(use_true_random=False))
    changes, changed_a_constant = [], False
    for _ in range(draw(st.integers(1, 3))):
        path = _field_to_corrupt(document, choose)
        if path is None:
            break
        changed_a_constant |= any(key in CONSTANT_KEYS for key in path if isinstance(key, str))
        changes.append((path, _corrupt_field(draw, _parent(document, path), path[-1],
                                             _vertex_names(document))))
    return document, changes, changed_a_constant


def _field_to_corrupt(document, choose) -> tuple | None:
    """A field of one vertex most of the time (where most of a graph is), else any field."""
    vertices = document.get("graph", {}).get("vertices") if isinstance(
        document.get("graph"), dict) else None
    if isinstance(vertices, list) and vertices and choose.random() < 0.8:
        index = choose.randrange(len(vertices))
        paths = [("graph", "vertices", index),
                 *(("graph", "vertices", index, *path) for path in _field_paths(vertices[index]))]
    else:
        paths = _field_paths(document)
    return choose.choice(paths) if paths else None


def _vertex_names(document) -> list[str]:
    graph = document.get("graph") if isinstance(document, dict) else None
    entries = [entry for key in ("inputs", "vertices") if isinstance(graph, dict)
               and isinstance(graph.get(key), list) for entry in graph[key]]
    return sorted({entry["name"] for entry in entries
                   if isinstance(entry, dict) and isinstance(entry.get("name"), str)})


def _corrupt_field(draw, parent, key, vertex_names: list[str]) -> str:
    action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "rename",
                                   "duplicate", "nudge"]))
    value = parent[key]
    if action == "nudge" and type(value) is int:  # a plausible size or index, one off
        parent[key] = value + draw(st.sampled_from([-1, 1]))
        return f"nudged to {parent[key]}"
    if action == "nudge" and isinstance(value, str) and vertex_names:  # another vertex's name
        parent[key] = draw(st.sampled_from(vertex_names))
        return f"renamed to {parent[key]!r}"
    if action in ("replace", "nudge"):
        parent[key] = copy.deepcopy(draw(st.sampled_from(REPLACEMENTS)))
        return f"replaced by {parent[key]!r}"
    if action == "delete":
        del parent[key]
        return "deleted"
    if action == "rename" and isinstance(parent, dict):
        new_key = draw(st.sampled_from(["zzz", "type", "name", "kind", "config"]))
        parent[new_key] = parent.pop(key)
        return f"renamed {new_key!r}"
    if isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
        return "duplicated"
    parent[key] = [parent[key], parent[key]]
    return "doubled"


def _graph_text(document: dict, depth: int) -> str:
    """The document as JSON, each DEEP marker replaced by lists nested ``depth`` deep."""
    return json.dumps(document).replace(json.dumps(DEEP), "[" * depth + "0" + "]" * depth)


@st.composite
def tensor_file_corruptions(draw, tensor_bytes: bytes) -> bytes:
    action = draw(st.sampled_from(["truncate", "flip", "header", "header", "header"]))
    if action == "truncate":
        return tensor_bytes[:draw(st.integers(0, len(tensor_bytes) - 1))]
    if action == "flip":
        position = draw(st.integers(0, len(tensor_bytes) - 1))
        flipped = tensor_bytes[position] ^ draw(st.integers(1, 255))
        return tensor_bytes[:position] + bytes([flipped]) + tensor_bytes[position + 1:]
    length = int.from_bytes(tensor_bytes[:8], "little")
    header = json.loads(tensor_bytes[8:8 + length])
    name = draw(st.sampled_from(sorted(key for key in header if key != "__metadata__")))
    _corrupt_header_entry(draw, header, name)
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + tensor_bytes[8 + length:]


def _corrupt_header_entry(draw, header: dict, name: str) -> None:
    entry = header[name]
    change = draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "delete", "same-size"]))
    if change == "dtype":
        entry["dtype"] = draw(st.sampled_from(NEW_DTYPES))
    elif change == "shape":
        entry["shape"] = draw(st.sampled_from([*HUGE_SHAPES, [-1], [0], entry["shape"][::-1],
                                               [*entry["shape"], 1], []]))
    elif change == "offsets":
        start, end = entry["data_offsets"]
        shift = draw(st.sampled_from([-4, 4, 1 << 40]))
        entry["data_offsets"] = [max(start + shift, 0), end + shift]
    elif change == "rename":
        header[draw(st.sampled_from(["non_persistent:" + name, name + ".x", "zzz"]))] = \
            header.pop(name)
    elif change == "delete":
        del header[name]
    else:  # a dtype of the same size: the file stays valid, the graph decides
        same_size = {"F32": "I32", "I64": "F64", "F64": "I64", "I32": "F32"}
        entry["dtype"] = same_size.get(entry["dtype"], entry["dtype"])


# --------------------------------------------------------------------------------- checking
def _write_save(directory: Path, graph_text: str, tensor_bytes: bytes) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "graph.json").write_text(graph_text)
    (directory / "tensors.safetensors").write_bytes(tensor_bytes)


def _assert_loads_cleanly(directory: Path, saved: SavedModel, may_fail_when_run: bool,
                          changes: object = None) -> str:
    """Loads the save; returns "refused", "runs" or "fails when run" (asserting which may)."""
    try:
        with allocation_limit(LOAD_MEMORY_BOUND):
            dag = dagprune.load_dag(directory)
    except SerializationError as error:
        assert not is_allocation_failure(error), f"loading exceeded the memory bound: {error}"
        return "refused"
    dag.lint()
    try:
        with allocation_limit(RUN_MEMORY_BOUND), torch.no_grad():
            torch.manual_seed(0)
            dag(saved.example)
    except Exception as error:  # noqa: BLE001 - what a valid but different model may raise
        assert may_fail_when_run, \
            f"a loaded DAG fails to run: {type(error).__name__}: {error}; changes: {changes}"
        return "fails when run"
    return "runs"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corrupted")


@pytest.fixture(scope="module")
def peak_memory_stays_bounded():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    assert growth < RSS_GROWTH_BOUND, f"peak memory grew by {growth:,} bytes"


FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.large_base_example])


@pytest.mark.usefixtures("peak_memory_stays_bounded")
@settings(max_examples=GRAPH_EXAMPLES, **FUZZ_SETTINGS)
@given(data=st.data())
def test_a_corrupted_graph_is_refused_or_loads_a_working_dag(saved_models, scratch, data):
    saved = saved_models[data.draw(st.sampled_from(sorted(MODELS)))]
    document, changes, changed_a_constant = data.draw(graph_corruptions(saved.document))
    depth = data.draw(st.sampled_from([50, 99, 150, 1000, 100_000]))
    _write_save(scratch / "graph", _graph_text(document, depth), saved.tensor_bytes)
    _assert_loads_cleanly(scratch / "graph", saved, changed_a_constant, changes)


@pytest.mark.usefixtures("peak_memory_stays_bounded")
@settings(max_examples=TENSOR_FILE_EXAMPLES, **FUZZ_SETTINGS)
@given(data=st.data())
def test_a_corrupted_tensor_file_is_refused_or_loads_a_working_dag(saved_models, scratch, data):
    saved = saved_models[data.draw(st.sampled_from(sorted(MODELS)))]
    tensor_bytes = data.draw(tensor_file_corruptions(saved.tensor_bytes))
    document = copy.deepcopy(saved.document)
    if data.draw(st.booleans()):  # vouch for the corrupted file, so the checks behind run
        document["tensors_sha256"] = hashlib.sha256(tensor_bytes).hexdigest()
    _write_save(scratch / "tensors", json.dumps(document), tensor_bytes)
    _assert_loads_cleanly(scratch / "tensors", saved, may_fail_when_run=False)


def test_uncorrupted_saves_load_and_match(saved_models, scratch):
    """The property's baseline: every model's save, written back unchanged, loads bit-exact."""
    for name, saved in saved_models.items():
        _write_save(scratch / name, json.dumps(saved.document), saved.tensor_bytes)
        with torch.no_grad():
            assert torch.equal(dagprune.load_dag(scratch / name)(saved.example), saved.output), name
