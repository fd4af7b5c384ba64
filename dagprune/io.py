"""Saving and loading DAGs without pickle: a JSON graph plus a safetensors file.

A saved DAG is a directory holding ``graph.json`` (vertices, their op types and constant
arguments, predecessors, outputs) and ``tensors.safetensors`` (every parameter and buffer). The
graph records the SHA-256 of the tensor file, so a graph never loads with tensors from another
save. Loading instantiates only registered op types and allowed layer types, and calls only
registered functions, so a file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from dagprune.dag_module import _NO_DEFAULT, DagModule, InnerVertex, InputVertex, Vertex
from dagprune.errors import SerializationError
from dagprune.module_serialization import build_module, describe_module
from dagprune.ops.base import OP_TYPES
from dagprune.ops.parameter import ModuleCallOp
from dagprune.ops.templates import decode_template, encode_template

__all__ = ["save_dag", "load_dag", "load_dag_from_path", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "dagprune-dag"
FORMAT_VERSION = 1
GRAPH_FILE = "graph.json"
TENSORS_FILE = "tensors.safetensors"


def save_dag(dag: DagModule, path: str | os.PathLike) -> str:
    """Saves ``dag`` to the directory ``path`` atomically; returns the path.

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
               for name, tensor in dag.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensor_file = staging / TENSORS_FILE
        safetensors.torch.save_file(tensors, str(tensor_file), metadata={"format": FORMAT_NAME})
        document = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                    "torch_version": torch.__version__,
                    "tensors_sha256": _sha256(tensor_file), "training": dag.training,
                    "graph": graph}
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
    if document.get("version") != FORMAT_VERSION:
        raise SerializationError(f"{graph_file} has format version {document.get('version')!r}; "
                                 f"this dagprune reads version {FORMAT_VERSION}")
    if document.get("tensors_sha256") != _sha256(tensor_file):
        raise SerializationError(f"{tensor_file} does not match {graph_file} (checksum differs): "
                                 "the tensor file is truncated, corrupt or from another save")
    _register_timm_support_if_needed(document)
    try:
        dag = _build_dag(document["graph"])
    except SerializationError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise SerializationError(f"{graph_file} is malformed: {type(error).__name__}: {error}") from error
    try:
        tensors = safetensors.torch.load_file(str(tensor_file), device=str(map_location))
    except Exception as error:
        raise SerializationError(f"{tensor_file} cannot be read: {error}") from error
    _load_tensors(dag, tensors, tensor_file)
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
        return {"kind": "layer", **describe_module(module)}
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
            return build_module(spec)
    except SerializationError as error:
        raise SerializationError(f"cannot load vertex {vertex_name!r}: {error}") from error
    raise SerializationError(f"vertex {vertex_name!r} has an unknown module kind {kind!r}")


def _load_tensors(dag: DagModule, tensors: dict[str, torch.Tensor], tensor_file: Path) -> None:
    expected = dag.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [name for name in expected if name in tensors
                   and tensors[name].shape != expected[name].shape]
    if missing or unexpected or wrong_shape:
        raise SerializationError(
            f"{tensor_file} does not fit the graph: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {wrong_shape[:5]}")
    targets = {**dict(dag.named_buffers()), **dict(dag.named_parameters())}
    for name, tensor in tensors.items():  # keep dtypes exactly as saved
        target = targets[name]
        if target.dtype != tensor.dtype:
            target.data = target.data.to(tensor.dtype)
    dag.load_state_dict(tensors, strict=True)


def _register_timm_support_if_needed(document: dict) -> None:
    if '"timm.' in json.dumps(document["graph"]):
        import dagprune.timm_layers  # noqa: F401  (registers timm's functions and layers)


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
