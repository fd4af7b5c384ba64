"""Saving and loading DAGs without pickle: a JSON graph plus a safetensors file.

A saved DAG is a directory holding ``graph.json`` (vertices, their op types and constant
arguments, predecessors, outputs) and ``tensors.safetensors`` (every parameter and buffer,
non-persistent buffers included, under ``non_persistent:<path>``). The graph records the
SHA-256 of the tensor file, so a graph never loads with tensors from another save. It also
records which modules, parameters and buffers are one object reached by several paths (a layer
called at two places, tied weights), and loading restores that sharing. Loading instantiates
only registered op types and allowed layer types, and calls only registered functions, so a
file cannot run code.

Saving replaces a previous save in the same directory atomically (a complete DAG, the old one
or the new one, loads from the path at every instant) and never touches the directory's other
files; :mod:`dagprune.save_directory` describes how.

Loading is bounded, and checks everything before it allocates anything:

1. ``graph.json`` is read within fixed limits of size, nesting and integer range, and every
   field is checked for presence and type (:mod:`dagprune.saved_graph`).
2. The tensor file is found by the digest the graph records, and its header (names, shapes,
   dtypes) is read; safetensors checks that the header fits the file's length.
3. The modules are built on the meta device, which allocates nothing, with at most
   :data:`OPERATIONS_PER_TENSOR` tensor operations per tensor of the file (a constructor looping
   over a huge ``num_layers`` stops there). Every parameter and buffer must match a tensor of
   the file in name and shape, and in dtype: exactly where the graph records the dtype (layers
   saved by structure, parameter ops), floating point for floating point where a layer's
   constructor chooses it (the file keeps a half-precision model half).
4. Only then are the modules built on ``map_location`` and filled from the file, one vertex at a
   time.

So a small file cannot make loading allocate more than its tensor file holds, and every
corruption raises :class:`~dagprune.errors.SerializationError` naming the file, the field and
the vertex.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dagprune.dag_module import (_NO_DEFAULT, DagModule, InnerVertex, InputVertex, Vertex,
                                 register_dag_saver)
from dagprune.errors import DagLintError, SerializationError
from dagprune.integrations import load_support_for_graph
from dagprune.module_serialization import (build_module, check_config_reads_back,
                                           describe_module, tensors_with_recorded_dtype)
from dagprune.ops.base import OP_TYPES
from dagprune.ops.parameter import ModuleCallOp, ParameterOp
from dagprune.ops.templates import decode_template, encode_template
from dagprune.save_directory import (GRAPH_FILE, TENSORS_FILE, file_sha256, tensor_file_candidates,
                                     write_dag_files)
from dagprune.saved_graph import (FORMAT_NAME, field_error, format_field_path,
                                  read_graph_document)
from dagprune.shared_objects import restore_sharing, shared_objects

__all__ = ["save_dag", "load_dag", "load_dag_from_path", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_VERSION = 2
NON_PERSISTENT_PREFIX = "non_persistent:"  # DAG state-dict keys all start with "vertex_modules."
OPERATIONS_PER_TENSOR = 64
"""Tensor operations allowed per tensor of the file while building modules (layers need ~6)."""
_OPERATIONS_BASE = 10_000
_MAX_UNSAVED_BYTES = 64 << 20  # format 1: non-persistent buffers its constructors make
_sha256 = file_sha256
_SAFETENSORS_DTYPES = {code: getattr(torch, name) for code, name in (
    ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("I16", "int16"), ("U16", "uint16"),
    ("I32", "int32"), ("U32", "uint32"), ("I64", "int64"), ("U64", "uint64"),
    ("F16", "float16"), ("BF16", "bfloat16"), ("F32", "float32"), ("F64", "float64"),
    ("C64", "complex64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, name)}


@register_dag_saver
def save_dag(dag: DagModule, path: str | os.PathLike) -> str:
    """Saves ``dag`` to the directory ``path``; returns the path.

    :meth:`DagModule.save` calls this function.

    A previous save at ``path`` is replaced atomically: at every instant the path holds a
    complete DAG, the previous one or the new one, and an interrupted save leaves no staging
    files. Files of the directory that the save did not write are kept.

    Raises:
        SerializationError: a module or constant of the DAG cannot be described, or ``path`` is
            a file or a directory that holds other files but no saved DAG (nothing is written).

    >>> import tempfile, dagprune
    >>> dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     loaded = dagprune.load_dag(dag.save(f"{d}/model"))
    >>> torch.equal(loaded(torch.ones(1, 2)), dag(torch.ones(1, 2)))
    True
    """
    dag.lint()
    graph, shared = _describe_dag(dag), shared_objects(dag)
    tensors = {name: tensor.detach().to("cpu").contiguous().clone()
               for name, tensor in _tensors_to_save(dag).items()}

    def document_for(tensors_sha256: str) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "torch_version": torch.__version__, "tensors_sha256": tensors_sha256,
                "training": dag.training, "graph": graph, "shared": shared}

    write_dag_files(Path(path), tensors, document_for)
    return str(path)


def load_dag(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DagModule:
    """Loads a DAG saved by :func:`save_dag` (or :meth:`DagModule.save`).

    Args:
        path: the directory of the save.
        map_location: the device to build the DAG on: any ``torch.device`` or device string
            (``"cpu"``, ``"cuda:1"``, ``"meta"`` for its structure without values).

    Raises:
        SerializationError: the path is missing, foreign, truncated or corrupt, or
            ``map_location`` is not a device of this machine; the message says which file and
            field are wrong, and which vertex they belong to.

    >>> import tempfile, dagprune
    >>> dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Linear(2, 3)))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     skeleton = dagprune.load_dag(dag.save(f"{d}/model"), map_location="meta")
    >>> skeleton(torch.ones(1, 2, device="meta")).shape, skeleton.vertex_modules["_0"].weight.device
    (torch.Size([1, 3]), device(type='meta'))
    """
    device = _device_to_load_on(map_location)
    path = Path(path)
    graph_file = _graph_file_of(path)
    document = read_graph_document(graph_file)
    tensor_file = _find_tensor_file(path, document["tensors_sha256"], graph_file)
    load_support_for_graph(document["graph"])
    loading = _Loading(graph_file, tensor_file, document)
    with _open_saved_tensors(tensor_file) as saved:
        dag = loading.build(saved, torch.device("meta"))
        if device.type != "meta":
            dag = loading.build(saved, device)
            loading.fill(dag, saved)
    dag.train(document.get("training", False))
    try:
        dag.lint()
    except DagLintError as error:
        raise SerializationError(f"{graph_file} describes a malformed DAG: {error}") from error
    return dag


def load_dag_from_path(path: str | os.PathLike) -> DagModule:
    """Alias of :func:`load_dag`, under the name torch-dag users know."""
    return load_dag(path)


def _device_to_load_on(map_location: Any) -> torch.device:
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError, ValueError) as error:
        raise SerializationError(f"map_location={map_location!r} is not a device ({error}); pass "
                                 "a torch.device or a string such as 'cpu', 'cuda:0' or "
                                 "'meta'") from error
    if device.type != "meta":
        try:
            torch.empty(0, device=device)
        except Exception as error:  # noqa: BLE001 - each backend fails its own way
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise SerializationError(f"cannot load onto {device}: this machine cannot allocate "
                                     f"there ({reason}); pass map_location='cpu'") from error
    return device


def _graph_file_of(path: Path) -> Path:
    if not path.is_dir():
        raise SerializationError(f"{path} is not a saved dagprune DAG (expected a directory with "
                                 f"{GRAPH_FILE} and {TENSORS_FILE})")
    if not (path / GRAPH_FILE).is_file():
        raise SerializationError(f"{path} lacks {GRAPH_FILE}: not a complete dagprune save")
    return path / GRAPH_FILE


def _find_tensor_file(path: Path, digest: str, graph_file: Path) -> Path:
    """The tensor file whose SHA-256 is the graph's ``digest`` (see dagprune.save_directory)."""
    present = [file for file in tensor_file_candidates(path, digest) if file.is_file()]
    if not present:
        raise SerializationError(f"{path} lacks {TENSORS_FILE}: not a complete dagprune save")
    for file in present:
        if _sha256(file) == digest:
            return file
    raise SerializationError(f"{present[-1]} does not match {graph_file} (checksum differs): "
                             "the tensor file is truncated, corrupt or from another save")


# --------------------------------------------------------------------------------- describing
def _describe_input(vertex: InputVertex) -> dict:
    """An input's name, its default when it has one, and ``"fixed": true`` for an argument the
    model was converted with a constant value for."""
    description = {"name": vertex.name}
    if vertex.has_default:
        description["default"] = encode_template(vertex.default)
    if vertex.fixed:
        description["fixed"] = True
    return description


def _describe_dag(dag: DagModule) -> dict:
    return {
        "name": dag.name,
        "inputs": [_describe_input(v) for v in dag.inputs],
        "vertices": [{"name": v.name, "predecessors": [p.name for p in v.predecessors],
                      "qualified_name": v.qualified_name, "module": _describe(v.module, v)}
                     for v in dag.inner_vertices],
        "outputs": [v.name for v in dag.output_vertices],
        "output_structure": encode_template(dag.output_structure),
    }


def _describe(module: nn.Module, vertex: Vertex) -> dict:
    try:
        if isinstance(module, DagModule):
            return {"kind": "dag", "dag": _describe_dag(module)}
        if isinstance(module, ModuleCallOp):
            return {"kind": "module_call", "module": _describe(module.module, vertex),
                    "args": encode_template(module.args), "kwargs": encode_template(module.kwargs)}
        if OP_TYPES.get(type(module).__name__) is type(module) and hasattr(module, "get_config"):
            return {"kind": "op", "type": type(module).__name__, "config": module.get_config()}
        return {"kind": "layer", **describe_module(module, vertex.qualified_name or vertex.name)}
    except SerializationError as error:
        raise SerializationError(f"cannot save vertex {vertex.name!r}: {error}") from error


# --------------------------------------------------------------------------------- loading
class _SavedTensors:
    """The tensors of an open safetensors file: names, shapes and dtypes from its header, values
    one at a time (so that loading holds one vertex's tensors beside the model, not a copy)."""

    def __init__(self, reader, tensor_file: Path):
        self._reader = reader
        self.shapes: dict[str, torch.Size] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for name in reader.keys():
            view = reader.get_slice(name)
            if view.get_dtype() not in _SAFETENSORS_DTYPES:
                raise SerializationError(f"{tensor_file}: tensor {name!r} has the dtype "
                                         f"{view.get_dtype()}, which dagprune does not load")
            self.shapes[name] = torch.Size(view.get_shape())
            self.dtypes[name] = _SAFETENSORS_DTYPES[view.get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        return self._reader.get_tensor(name)


@contextlib.contextmanager
def _open_saved_tensors(tensor_file: Path):
    """The tensors of ``tensor_file``, while it is open; a file safetensors refuses is reported."""
    try:
        reader = safetensors.safe_open(str(tensor_file), framework="pt", device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors reports its own error types
        raise SerializationError(f"{tensor_file} cannot be read: {error}") from error
    with reader:
        yield _SavedTensors(reader, tensor_file)


class _OperationBudget(TorchFunctionMode):
    """Stops the building of a graph's modules after ``limit`` tensor operations.

    Constructors loop over arguments from the file (an ``nn.LSTM`` config with
    ``num_layers=10**8``): on the meta device that allocates nothing but would still take hours
    and fill memory with Python objects.
    """

    def __init__(self, limit: int, graph_file: Path, tensor_count: int):
        super().__init__()
        self.limit, self.used = limit, 0
        self._graph_file, self._tensor_count = graph_file, tensor_count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.used += 1
        if self.used > self.limit:
            raise SerializationError(
                f"building the modules of {self._graph_file} takes more than {self.limit:,} "
                f"tensor operations, far more than {self._tensor_count} saved tensors need: a "
                "layer's arguments describe many more tensors than the tensor file holds")
        return func(*args, **(kwargs or {}))


class _Loading:
    """Builds the DAG a checked graph document describes, and fills it from its tensor file."""

    def __init__(self, graph_file: Path, tensor_file: Path, document: dict):
        self.graph_file, self.tensor_file, self.document = graph_file, tensor_file, document
        self.saves_non_persistent = document["version"] >= 2

    def build(self, saved: _SavedTensors, device: torch.device) -> DagModule:
        """The DAG on ``device``, its tensors checked against the file's (not yet filled)."""
        budget = _OperationBudget(OPERATIONS_PER_TENSOR * len(saved.shapes) + _OPERATIONS_BASE,
                                  self.graph_file, len(saved.shapes))
        with torch.device(device), budget:
            dag = self._build_dag(self.document["graph"], ("graph",))
            self._restoreshared_objects(dag)
        self._check_tensors_fit(dag, saved)
        if device.type == "meta":
            _adopt_saved_dtypes(dag, saved)
        return dag

    def fill(self, dag: DagModule, saved: _SavedTensors) -> None:
        """Copies the file's values into ``dag``, one vertex module at a time."""
        try:
            _load_tensors(dag, saved, self.saves_non_persistent)
        except SerializationError:
            raise
        except Exception as error:  # noqa: BLE001 - safetensors or torch reading the file
            raise SerializationError(f"{self.tensor_file} cannot be read: {error}") from error

    # ------------------------------------------------------------------------- building
    def _build_dag(self, graph: dict, path: tuple) -> DagModule:
        by_name: dict[str, Vertex] = {}
        inputs = []
        for index, entry in enumerate(graph["inputs"]):
            default = self._decode(entry["default"], (*path, "inputs", index, "default")) \
                if "default" in entry else _NO_DEFAULT
            vertex = InputVertex(entry["name"], default, fixed=entry.get("fixed", False))
            by_name[vertex.name] = vertex
            inputs.append(vertex)
        inner = []
        for index, entry in enumerate(graph["vertices"]):
            module = self._build_vertex_module(entry, (*path, "vertices", index, "module"))
            vertex = InnerVertex(entry["name"], module, [by_name[p] for p in entry["predecessors"]],
                                 entry.get("qualified_name"))
            by_name[vertex.name] = vertex
            inner.append(vertex)
        structure = self._decode(graph["output_structure"], (*path, "output_structure"))
        try:
            return DagModule(inputs, inner, [by_name[name] for name in graph["outputs"]],
                             structure, name=graph.get("name", "dag"))
        except Exception as error:  # noqa: BLE001 - e.g. a vertex name nn.ModuleDict refuses
            raise self._field_error(path, f"does not form a DAG ({type(error).__name__}: "
                                          f"{error})") from error

    def _build_vertex_module(self, entry: dict, path: tuple) -> nn.Module:
        """The vertex's module; an error names the vertex and the field (a nested DAG's errors
        name its own vertices, by their full field path)."""
        try:
            return self._build(entry["module"], entry["name"], path)
        except Exception as error:  # noqa: BLE001 - an allowed constructor refusing file data
            if entry["module"]["kind"] == "dag" and isinstance(error, SerializationError):
                raise
            reason = str(error) if isinstance(error, SerializationError) else \
                f"{type(error).__name__}: {error}"
            raise SerializationError(f"cannot load vertex {entry['name']!r}: {reason} (in "
                                     f"{self.graph_file}, field {format_field_path(path)!r})"
                                     ) from error

    def _build(self, spec: dict, vertex_name: str, path: tuple) -> nn.Module:
        kind = spec["kind"]
        if kind == "dag":
            return self._build_dag(spec["dag"], (*path, "dag"))
        if kind == "module_call":
            return ModuleCallOp(self._build(spec["module"], vertex_name, (*path, "module")),
                                decode_template(spec["args"]), decode_template(spec["kwargs"]))
        if kind == "op":
            return _build_op(spec)
        return build_module(spec, vertex_name)

    def _decode(self, data: Any, path: tuple) -> Any:
        try:
            return decode_template(data)
        except SerializationError as error:
            raise self._field_error(path, f"is not a valid constant: {error}") from error

    def _restoreshared_objects(self, dag: DagModule) -> None:
        try:
            restore_sharing(dag, self.document.get("shared", {}))
        except SerializationError as error:
            raise self._field_error(("shared",), f"cannot be restored: {error}") from error
        except Exception as error:  # noqa: BLE001 - paths that name no module or tensor
            raise self._field_error(("shared",), f"names a path the DAG does not have "
                                                 f"({type(error).__name__}: {error})") from error

    def _field_error(self, path: tuple, problem: str) -> SerializationError:
        return field_error(self.graph_file, self.document, path, problem)

    # ------------------------------------------------------------------------- checking
    def _check_tensors_fit(self, dag: DagModule, saved: _SavedTensors) -> None:
        """Every tensor of ``dag`` must be in the file with its shape and a fitting dtype."""
        recorded = _recorded_dtype_names(self.document["graph"])
        expected = dict(dag.state_dict(keep_vars=True))
        non_persistent = _non_persistent_buffers(dag)
        if self.saves_non_persistent:
            expected.update({NON_PERSISTENT_PREFIX + name: buffer
                             for name, buffer in non_persistent.items()})
        else:
            self._check_unsaved_buffers_are_small(non_persistent)
        problems = _misfits(expected, saved, recorded)
        found = "; ".join(f"{kind} {names[:5]}" for kind, names in problems.items() if names)
        if found:
            raise SerializationError(
                f"{self.tensor_file} does not fit the graph {self.graph_file}: tensors {found}; "
                "the two files are from different saves or corrupt: save the DAG again")

    def _check_unsaved_buffers_are_small(self, buffers: dict[str, torch.Tensor]) -> None:
        size = sum(buffer.numel() * buffer.element_size() for buffer in buffers.values())
        if size > _MAX_UNSAVED_BYTES:
            raise SerializationError(
                f"{self.graph_file} (format version 1) describes {size:,} bytes of non-persistent "
                f"buffers, more than the {_MAX_UNSAVED_BYTES:,} such a save can hold: the file is "
                "corrupt")


def _misfits(expected: dict[str, torch.Tensor], saved: _SavedTensors,
             recorded: set[str]) -> dict[str, list[str]]:
    """The tensors missing from the file, unexpected in it, or there with another shape or a
    dtype that does not fit (see :func:`_dtype_fits`), by kind of problem."""
    common = [name for name in expected if name in saved.shapes]
    return {
        "missing": sorted(set(expected) - set(saved.shapes)),
        "unexpected": sorted(set(saved.shapes) - set(expected)),
        "wrong shape": [f"{name} (graph {list(expected[name].shape)}, file "
                        f"{list(saved.shapes[name])})" for name in common
                        if saved.shapes[name] != expected[name].shape],
        "wrong dtype": [f"{name} (graph {expected[name].dtype}, file {saved.dtypes[name]})"
                        for name in common if not _dtype_fits(
                            expected[name].dtype, saved.dtypes[name],
                            name.removeprefix(NON_PERSISTENT_PREFIX) in recorded)],
    }


def _build_op(spec: dict) -> nn.Module:
    op_type = OP_TYPES.get(spec["type"])
    if op_type is None:
        close = difflib.get_close_matches(spec["type"], OP_TYPES, n=3)
        raise SerializationError(f"unknown op type {spec['type']!r}" + (
            f" (closest: {', '.join(close)})" if close else "") + "; if a package defines it, "
            "import that package before loading so that it registers the op type")
    op = op_type.from_config(spec["config"])
    check_config_reads_back(spec["type"], spec["config"], op.get_config())
    return op


def _recorded_dtype_names(graph: dict, prefix: str = "") -> set[str]:
    """State names of the tensors whose dtype the graph records (see _dtype_fits)."""
    names: set[str] = set()
    for entry in graph["vertices"]:
        names |= _recorded_in_module(entry["module"], f"{prefix}vertex_modules.{entry['name']}.")
    return names


def _recorded_in_module(spec: dict, prefix: str) -> set[str]:
    if spec["kind"] == "dag":
        return _recorded_dtype_names(spec["dag"], prefix)
    if spec["kind"] == "module_call":
        return _recorded_in_module(spec["module"], prefix + "module.")
    if spec["kind"] == "op":
        return {prefix + "value"} if spec["type"] == ParameterOp.__name__ else set()
    return {prefix + name for name in tensors_with_recorded_dtype(spec)}


def _dtype_fits(built: torch.dtype, saved: torch.dtype, recorded: bool) -> bool:
    """The saved dtype must be the recorded one; where a constructor chose the dtype, any
    floating-point dtype may replace a floating-point one (a model saved in half precision)."""
    return built == saved or (not recorded and built.is_floating_point and saved.is_floating_point)


def _adopt_saved_dtypes(dag: DagModule, saved: _SavedTensors) -> None:
    for name, tensor in _tensors_by_saved_name(dag).items():
        if tensor.dtype != saved.dtypes[name]:
            tensor.data = tensor.data.to(saved.dtypes[name])


def _tensors_by_saved_name(dag: DagModule) -> dict[str, torch.Tensor]:
    tensors = dict(dag.state_dict(keep_vars=True))
    tensors.update({NON_PERSISTENT_PREFIX + name: buffer
                    for name, buffer in _non_persistent_buffers(dag).items()})
    return tensors


def _load_tensors(dag: DagModule, saved: _SavedTensors, saves_non_persistent: bool) -> None:
    targets = {**dict(dag.named_buffers(remove_duplicate=False)),
               **dict(dag.named_parameters(remove_duplicate=False))}
    state = [name for name in saved.shapes if not name.startswith(NON_PERSISTENT_PREFIX)]
    for owner, names in _by_vertex_module(state).items():  # one vertex's tensors at a time
        loaded = {}
        for name in names:
            tensor, target = saved.get(name), targets[name]
            if target.dtype != tensor.dtype:  # keep dtypes exactly as saved
                target.data = target.data.to(tensor.dtype)
            loaded[name[len(owner) + 1:] if owner else name] = tensor
        (dag.get_submodule(owner) if owner else dag).load_state_dict(loaded, strict=True)
    if not saves_non_persistent:  # format version 1: the layers' constructors made them
        return
    with torch.no_grad():
        for name, target in _non_persistent_buffers(dag).items():
            target.data = saved.get(NON_PERSISTENT_PREFIX + name).to(target.device).clone()


def _by_vertex_module(names) -> dict[str, list[str]]:
    """State-dict names grouped by the vertex module holding them (``vertex_modules.<name>``);
    the whole DAG (key ``""``) for any name outside a vertex module."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        owner = ".".join(parts[:2]) if parts[0] == "vertex_modules" and len(parts) > 2 else ""
        groups.setdefault(owner, []).append(name)
    if "" in groups and len(groups) > 1:  # a name outside the vertex modules: load all at once
        return {"": [name for group in groups.values() for name in group]}
    return groups


def _tensors_to_save(dag: DagModule) -> dict[str, torch.Tensor]:
    """The state dict plus the non-persistent buffers, which it leaves out but a rebuilt-by-
    structure module needs (nothing else recomputes them)."""
    tensors = dict(dag.state_dict())
    for name, buffer in _non_persistent_buffers(dag).items():
        tensors[NON_PERSISTENT_PREFIX + name] = buffer
    return tensors


def _non_persistent_buffers(dag: DagModule) -> dict[str, torch.Tensor]:
    return {f"{path}.{name}" if path else name: module._buffers[name]
            for path, module in dag.named_modules(remove_duplicate=False)
            for name in sorted(module._non_persistent_buffers_set)
            if module._buffers.get(name) is not None}
