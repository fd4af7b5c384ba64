"""Saving and loading DAGs without pickle: a JSON graph plus a safetensors file.

A saved DAG is a directory holding ``graph.json`` (vertices, their op types and constant
arguments, predecessors, outputs) and ``tensors.safetensors`` (every parameter and buffer,
non-persistent buffers included, under ``non_persistent:<path>``). The graph records the
SHA-256 of the tensor file, so a graph never loads with tensors from another save. It also
records which modules, parameters and buffers are one object reached by several paths (a layer
called at two places, tied weights), and loading restores that sharing. Loading instantiates
only registered op types and allowed layer types, and calls only registered functions, so a
file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from dagprune.dag_module import (_NO_DEFAULT, DagModule, InnerVertex, InputVertex, Vertex,
                                 register_dag_saver)
from dagprune.errors import SerializationError
from dagprune.integrations import load_support_for_graph
from dagprune.module_serialization import build_module, describe_module
from dagprune.ops.base import OP_TYPES
from dagprune.ops.parameter import ModuleCallOp
from dagprune.ops.templates import decode_template, encode_template

__all__ = ["save_dag", "load_dag", "load_dag_from_path", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "dagprune-dag"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no structural modules, non-persistent buffers or sharing
NON_PERSISTENT_PREFIX = "non_persistent:"  # DAG state-dict keys all start with "vertex_modules."
GRAPH_FILE = "graph.json"
TENSORS_FILE = "tensors.safetensors"


@register_dag_saver
def save_dag(dag: DagModule, path: str | os.PathLike) -> str:
    """Saves ``dag`` to the directory ``path`` atomically; returns the path.

    :meth:`DagModule.save` calls this function.

    The directory is written under a temporary name and renamed into place, so an interrupted
    save leaves either the previous contents or the new ones, never a mix.

    Raises:
        SerializationError: a module or constant of the DAG cannot be described.

    >>> import tempfile, dagprune
    >>> dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     loaded = dagprune.load_dag(dag.save(f"{d}/model"))
    >>> torch.equal(loaded(torch.ones(1, 2)), dag(torch.ones(1, 2)))
    True
    """
    dag.lint()
    path = Path(path)
    graph = _describe_dag(dag)
    tensors = {name: tensor.detach().to("cpu").contiguous().clone()
               for name, tensor in _tensors_to_save(dag).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensor_file = staging / TENSORS_FILE
        safetensors.torch.save_file(tensors, str(tensor_file), metadata={"format": FORMAT_NAME})
        document = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                    "torch_version": torch.__version__,
                    "tensors_sha256": _sha256(tensor_file), "training": dag.training,
                    "graph": graph, "shared": _shared_objects(dag)}
        _write_synced(staging / GRAPH_FILE, json.dumps(document, indent=1).encode())
        _replace_directory(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(path)


def load_dag(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DagModule:
    """Loads a DAG saved by :func:`save_dag` (or :meth:`DagModule.save`).

    Raises:
        SerializationError: the path is missing, foreign, truncated or corrupt; the message says
            which file and what is wrong.
    """
    path = Path(path)
    graph_file, tensor_file = path / GRAPH_FILE, path / TENSORS_FILE
    if not path.is_dir():
        raise SerializationError(f"{path} is not a saved dagprune DAG (expected a directory with "
                                 f"{GRAPH_FILE} and {TENSORS_FILE})")
    for required in (graph_file, tensor_file):
        if not required.is_file():
            raise SerializationError(f"{path} lacks {required.name}: not a complete dagprune save")
    try:
        document = json.loads(graph_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SerializationError(f"{graph_file} is not valid JSON (truncated or corrupt): {error}") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise SerializationError(f"{graph_file} is not a dagprune graph (format "
                                 f"{document.get('format') if isinstance(document, dict) else None!r})")
    version = document.get("version")
    if version not in READABLE_VERSIONS:
        raise SerializationError(f"{graph_file} has format version {version!r}; this dagprune "
                                 f"reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if document.get("tensors_sha256") != _sha256(tensor_file):
        raise SerializationError(f"{tensor_file} does not match {graph_file} (checksum differs): "
                                 "the tensor file is truncated, corrupt or from another save")
    try:
        load_support_for_graph(document["graph"])
        dag = _build_dag(document["graph"])
        _restore_sharing(dag, document.get("shared", {}))
    except SerializationError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise SerializationError(f"{graph_file} is malformed: {type(error).__name__}: {error}") from error
    try:
        with safetensors.safe_open(str(tensor_file), framework="pt", device=str(map_location)) as reader:
            _load_tensors(dag, _TensorReader(reader), tensor_file, saves_non_persistent=version >= 2)
    except SerializationError:
        raise
    except Exception as error:
        raise SerializationError(f"{tensor_file} cannot be read: {error}") from error
    dag.train(bool(document.get("training", False)))
    dag.lint()
    return dag


def load_dag_from_path(path: str | os.PathLike) -> DagModule:
    """Alias of :func:`load_dag`, under the name torch-dag users know."""
    return load_dag(path)


# --------------------------------------------------------------------------------- describing
def _describe_dag(dag: DagModule) -> dict:
    return {
        "name": dag.name,
        "inputs": [{"name": v.name, **({"default": encode_template(v.default)} if v.has_default
                                       else {})} for v in dag.inputs],
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


# --------------------------------------------------------------------------------- building
def _build_dag(graph: dict) -> DagModule:
    by_name: dict[str, Vertex] = {}
    inputs = []
    for entry in graph["inputs"]:
        vertex = InputVertex(entry["name"], decode_template(entry["default"]) if "default" in entry
                             else _NO_DEFAULT)
        by_name[vertex.name] = vertex
        inputs.append(vertex)
    inner = []
    for entry in graph["vertices"]:
        missing = [p for p in entry["predecessors"] if p not in by_name]
        if missing or entry["name"] in by_name:
            raise SerializationError(f"vertex {entry['name']!r} is duplicated or reads undefined "
                                     f"vertices {missing}")
        module = _build(entry["module"], entry["name"])
        vertex = InnerVertex(entry["name"], module, [by_name[p] for p in entry["predecessors"]],
                             entry.get("qualified_name"))
        by_name[vertex.name] = vertex
        inner.append(vertex)
    outputs = [by_name[name] for name in graph["outputs"]]
    return DagModule(inputs, inner, outputs, decode_template(graph["output_structure"]),
                     name=graph.get("name", "dag"))


def _build(spec: dict, vertex_name: str) -> nn.Module:
    kind = spec.get("kind")
    try:
        if kind == "dag":
            return _build_dag(spec["dag"])
        if kind == "module_call":
            return ModuleCallOp(_build(spec["module"], vertex_name), decode_template(spec["args"]),
                                decode_template(spec["kwargs"]))
        if kind == "op":
            op_type = OP_TYPES.get(spec["type"])
            if op_type is None:
                raise SerializationError(f"unknown op type {spec['type']!r}")
            return op_type.from_config(spec["config"])
        if kind == "layer":
            return build_module(spec, vertex_name)
    except SerializationError as error:
        raise SerializationError(f"cannot load vertex {vertex_name!r}: {error}") from error
    raise SerializationError(f"vertex {vertex_name!r} has an unknown module kind {kind!r}")


class _TensorReader:
    """The tensors of an open safetensors file: shapes up front, values one at a time (so that
    loading a large model holds one vertex's tensors beside the model, not a second copy of all
    of them)."""

    def __init__(self, reader):
        self._reader = reader
        self.shapes = {name: torch.Size(reader.get_slice(name).get_shape()) for name in reader.keys()}

    def get(self, name: str) -> torch.Tensor:
        return self._reader.get_tensor(name)


def _load_tensors(dag: DagModule, tensors: _TensorReader, tensor_file: Path,
                  saves_non_persistent: bool) -> None:
    non_persistent = {name[len(NON_PERSISTENT_PREFIX):]: name for name in tensors.shapes
                      if name.startswith(NON_PERSISTENT_PREFIX)}
    state = {name: shape for name, shape in tensors.shapes.items()
             if not name.startswith(NON_PERSISTENT_PREFIX)}
    _check_tensors_fit(dag.state_dict(), state, tensor_file, "")
    expected_non_persistent = _non_persistent_buffers(dag)
    if not saves_non_persistent:  # format version 1: the layers' constructors made them
        expected_non_persistent = {}
    _check_tensors_fit(expected_non_persistent, {name: tensors.shapes[saved] for name, saved
                                                 in non_persistent.items()}, tensor_file, "non-persistent ")
    targets = {**dict(dag.named_buffers(remove_duplicate=False)),
               **dict(dag.named_parameters(remove_duplicate=False))}
    for owner, names in _by_vertex_module(state).items():  # one vertex's tensors at a time
        loaded = {}
        for name in names:
            tensor, target = tensors.get(name), targets[name]
            if target.dtype != tensor.dtype:  # keep dtypes exactly as saved
                target.data = target.data.to(tensor.dtype)
            loaded[name[len(owner) + 1:] if owner else name] = tensor
        (dag.get_submodule(owner) if owner else dag).load_state_dict(loaded, strict=True)
    with torch.no_grad():
        for name, saved in non_persistent.items():
            target = expected_non_persistent[name]
            target.data = tensors.get(saved).to(target.device).clone()


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


def _check_tensors_fit(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Size],
                       tensor_file: Path, kind: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [name for name in expected if name in tensors
                   and tensors[name] != expected[name].shape]
    if missing or unexpected or wrong_shape:
        raise SerializationError(
            f"{tensor_file} does not fit the graph: {kind}tensors missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}")


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


# --------------------------------------------------------------------------------- sharing
def _shared_objects(dag: DagModule) -> dict[str, list[list[str]]]:
    """Groups of paths that reach one object: ``{"modules": [[owner, alias, ...]], ...}``.

    Paths inside an aliased module are left out: restoring the module shares them too.
    """
    modules = _paths_by_identity(dag.named_modules(remove_duplicate=False))
    aliases = [path for group in modules for path in group[1:]]

    def outside_aliases(groups):
        kept = [[p for p in group if not any(p.startswith(alias + ".") for alias in aliases)]
                for group in groups]
        return [group for group in kept if len(group) > 1]

    return {"modules": outside_aliases(modules),
            "parameters": outside_aliases(_paths_by_identity(
                dag.named_parameters(remove_duplicate=False))),
            "buffers": outside_aliases(_paths_by_identity(
                dag.named_buffers(remove_duplicate=False)))}


def _paths_by_identity(named_objects) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for path, value in named_objects:
        groups.setdefault(id(value), []).append(path)
    return [paths for paths in groups.values() if len(paths) > 1]


def _restore_sharing(dag: DagModule, shared: dict) -> None:
    """Makes every alias path of :func:`_shared_objects`' groups reach its group's owner."""
    for group in shared.get("modules", []):
        owner = dag.get_submodule(group[0])
        for alias in group[1:]:
            _share_module(dag, alias, owner)
    for kind, registry in (("parameters", "_parameters"), ("buffers", "_buffers")):
        for group in shared.get(kind, []):
            owner = _tensor_at(dag, group[0], registry)
            for alias in group[1:]:
                parent_path, _, name = alias.rpartition(".")
                current = _tensor_at(dag, alias, registry)
                if current.shape != owner.shape or current.dtype != owner.dtype:
                    raise SerializationError(f"shared {kind[:-1]} {alias!r} does not match "
                                             f"{group[0]!r} (shape or dtype differs)")
                getattr(dag.get_submodule(parent_path), registry)[name] = owner


def _share_module(dag: DagModule, alias: str, owner: nn.Module) -> None:
    parent_path, _, name = alias.rpartition(".")
    parent = dag.get_submodule(parent_path)
    current = parent._modules.get(name)
    if current is owner:
        return
    if type(current) is not type(owner):
        raise SerializationError(f"shared module {alias!r} is a {type(current).__name__}, not a "
                                 f"{type(owner).__name__} like the module it shares")
    holder = dag.get_submodule(parent_path.rpartition(".")[0]) if "." in parent_path else dag
    if isinstance(holder, DagModule) and holder.vertex_modules is parent:
        holder.replace_module(holder.vertex(name), owner)  # keeps the vertex and registry in step
    else:
        parent._modules[name] = owner


def _tensor_at(dag: DagModule, path: str, registry: str) -> torch.Tensor:
    parent_path, _, name = path.rpartition(".")
    tensor = getattr(dag.get_submodule(parent_path), registry).get(name)
    if tensor is None:
        raise SerializationError(f"the graph shares {path!r}, which is not a {registry[1:-1]}")
    return tensor


# --------------------------------------------------------------------------------- files
def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(file: Path, data: bytes) -> None:
    with open(file, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _replace_directory(staging: Path, target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise SerializationError(f"{target} exists and is a file, not a saved DAG; refusing to "
                                 "overwrite it")
    if target.exists() and not (target / GRAPH_FILE).exists() and any(target.iterdir()):
        raise SerializationError(f"{target} exists and is not a saved DAG; refusing to overwrite it")
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        if backup is not None:  # put the previous save back where it was
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
