"""Reading a saved DAG's ``graph.json`` within fixed bounds, and checking every field's type.

A graph file comes from disk and may be truncated, corrupt or hostile. Before anything is built
from it, :func:`read_graph_document`

* refuses a file larger than :data:`MAX_GRAPH_BYTES`, and reads it as JSON (a parse error, or
  nesting too deep for the parser, is a :class:`~dagprune.errors.SerializationError`);
* walks the parsed data once, without recursion, and refuses nesting deeper than
  :data:`MAX_NESTING` levels (so that the recursive decoders that follow stay far from Python's
  recursion limit) and integers outside the signed 64-bit range (no tensor size, index or
  argument torch accepts is larger);
* checks the fields of the document, the graph, its vertices and their module descriptions,
  and the shared-object groups: each must be present (where the format requires it) and of the
  right JSON type.

Every error names the field by its JSON path (``graph.vertices[3].module.config``) and, when
the field belongs to a vertex, the vertex.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dagprune.errors import SerializationError

__all__ = ["read_graph_document", "field_error", "format_field_path", "FORMAT_NAME",
           "READABLE_VERSIONS", "MAX_GRAPH_BYTES", "MAX_NESTING"]

FORMAT_NAME = "dagprune-dag"
READABLE_VERSIONS = (1, 2)  # version 1: no structural modules, non-persistent buffers or sharing
MAX_GRAPH_BYTES = 64 << 20
"""Largest ``graph.json`` read; the graphs of large timm models take a few megabytes."""
MAX_NESTING = 100
"""Deepest JSON nesting read; real graphs (nested DAGs of structural timm blocks) stay below 30."""
_INT64 = (-(1 << 63), (1 << 63) - 1)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODULE_KINDS = ("dag", "module_call", "op", "layer")
_SHARED_KINDS = ("modules", "parameters", "buffers")
_FIX = "the file is corrupt or was edited by hand: save the DAG again"

JsonPath = tuple  # keys and list indices from the document's root to a field


def read_graph_document(graph_file: Path) -> dict:
    """The checked contents of ``graph_file``.

    Raises:
        SerializationError: the file is too large, is not JSON, nests too deeply, holds an
            out-of-range integer, is not a dagprune graph of a readable version, or a field is
            missing or of the wrong type; the message names the field and the vertex.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     graph_file = Path(directory) / "graph.json"
    ...     _ = graph_file.write_text('{"format": "dagprune-dag", "version": 2, "training": "no"}')
    ...     try:
    ...         read_graph_document(graph_file)
    ...     except SerializationError as error:
    ...         print(str(error).split("graph.json: ")[1].split(";")[0])
    field 'training' must be true or false, got 'no'
    """
    document = _parse(graph_file)
    _check_bounds(document, graph_file)
    _check_format(document, graph_file)
    _check_document(_Checker(document, graph_file))
    return document


def field_error(graph_file: Path, document: Any, path: JsonPath,
                problem: str) -> SerializationError:
    """A :class:`SerializationError` for the field at ``path``, naming its vertex if it has one."""
    vertex = _vertex_name_at(document, path)
    where = f"field {format_field_path(path)!r}" + (f" (vertex {vertex!r})" if vertex else "")
    return SerializationError(f"{graph_file}: {where} {problem}; {_FIX}")


# --------------------------------------------------------------------------------- reading
def _parse(graph_file: Path) -> Any:
    size = graph_file.stat().st_size
    if size > MAX_GRAPH_BYTES:
        raise SerializationError(f"{graph_file} holds {size:,} bytes, more than the "
                                 f"{MAX_GRAPH_BYTES:,} a saved graph may take; it is not a "
                                 "dagprune graph (or raise dagprune.saved_graph.MAX_GRAPH_BYTES)")
    try:
        return json.loads(graph_file.read_bytes())
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError, too many digits
        raise SerializationError(f"{graph_file} is not valid JSON (truncated or corrupt): "
                                 f"{error}") from error
    except RecursionError as error:
        raise SerializationError(f"{graph_file} nests too deeply to be read (more than "
                                 f"{MAX_NESTING} levels); {_FIX}") from error


def _check_bounds(document: Any, graph_file: Path) -> None:
    """Refuses nesting deeper than MAX_NESTING and integers outside 64 bits, without recursion."""
    pending: list[tuple[Any, JsonPath]] = [(document, ())]
    while pending:
        value, path = pending.pop()
        if len(path) > MAX_NESTING:
            raise field_error(graph_file, document, path[:MAX_NESTING],
                              f"nests more than {MAX_NESTING} levels deep")
        if type(value) is int and not _INT64[0] <= value <= _INT64[1]:
            raise field_error(graph_file, document, path,
                              f"holds the integer {_short(value)}, outside the signed 64-bit range")
        if isinstance(value, dict):
            pending.extend((item, (*path, key)) for key, item in value.items())
        elif isinstance(value, list):
            pending.extend((item, (*path, index)) for index, item in enumerate(value))


def _check_format(document: Any, graph_file: Path) -> None:
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        found = document.get("format") if isinstance(document, dict) else None
        raise SerializationError(f"{graph_file} is not a dagprune graph (format "
                                 f"{_short(found)})")
    version = document.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise SerializationError(f"{graph_file} has format version {_short(version)}; this "
                                 f"dagprune reads versions {readable}")


# --------------------------------------------------------------------------------- fields
class _Checker:
    """Checks fields of one document and raises errors that name them."""

    def __init__(self, document: dict, graph_file: Path):
        self.document = document
        self.graph_file = graph_file

    def fail(self, path: JsonPath, problem: str) -> SerializationError:
        return field_error(self.graph_file, self.document, path, problem)

    def field(self, mapping: dict, path: JsonPath, key: str, kinds: tuple, what: str,
              required: bool = True) -> Any:
        """``mapping[key]``, checked to be one of ``kinds`` (``None`` when optional and absent)."""
        if key not in mapping:
            if required:
                raise self.fail((*path, key), "is missing")
            return None
        value = mapping[key]
        if not _is_instance(value, kinds):
            raise self.fail((*path, key), f"must be {what}, got {_short(value)}")
        return value

    def names(self, mapping: dict, path: JsonPath, key: str) -> list:
        values = self.field(mapping, path, key, (list,), "a list of vertex names")
        for index, value in enumerate(values):
            if not isinstance(value, str):
                raise self.fail((*path, key, index), f"must be a vertex name, got {_short(value)}")
        return values


def _is_instance(value: Any, kinds: tuple) -> bool:
    """isinstance, except that a bool is not an int (JSON tells ``true`` from ``1``)."""
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds)


def _check_document(checker: _Checker) -> None:
    document = checker.document
    checker.field(document, (), "training", (bool,), "true or false", required=False)
    checker.field(document, (), "torch_version", (str,), "a string", required=False)
    digest = checker.field(document, (), "tensors_sha256", (str,), "a SHA-256 digest")
    if not _SHA256.fullmatch(digest):
        raise checker.fail(("tensors_sha256",), f"must be 64 lowercase hex digits, got "
                                                f"{_short(digest)}")
    graph = checker.field(document, (), "graph", (dict,), "a JSON object")
    _check_graph(checker, graph, ("graph",))
    shared = checker.field(document, (), "shared", (dict,), "a JSON object", required=False)
    if shared is not None:
        _check_shared(checker, shared)


def _check_graph(checker: _Checker, graph: dict, path: JsonPath) -> None:
    checker.field(graph, path, "name", (str,), "a string", required=False)
    defined: set[str] = set()
    for index, entry in enumerate(checker.field(graph, path, "inputs", (list,), "a list")):
        entry_path = (*path, "inputs", index)
        if not isinstance(entry, dict):
            raise checker.fail(entry_path, f"must be a JSON object, got {_short(entry)}")
        _define(checker, defined, entry, entry_path)
        if checker.field(entry, entry_path, "fixed", (bool,), "true or false", required=False) \
                and "default" not in entry:
            raise checker.fail((*entry_path, "fixed"), "needs the input's default (its fixed value)")
    for index, entry in enumerate(checker.field(graph, path, "vertices", (list,), "a list")):
        _check_vertex(checker, defined, entry, (*path, "vertices", index))
    outputs = checker.names(graph, path, "outputs")
    undefined = [name for name in outputs if name not in defined]
    if undefined or not outputs:
        raise checker.fail((*path, "outputs"), f"must name defined vertices, got {_short(outputs)}")
    if "output_structure" not in graph:
        raise checker.fail((*path, "output_structure"), "is missing")


def _define(checker: _Checker, defined: set, entry: dict, path: JsonPath) -> str:
    name = checker.field(entry, path, "name", (str,), "a vertex name")
    if not name or "." in name:
        raise checker.fail((*path, "name"), f"must be a non-empty name without '.', got {name!r}")
    if name in defined:
        raise checker.fail((*path, "name"), f"repeats the vertex name {name!r}")
    defined.add(name)
    return name


def _check_vertex(checker: _Checker, defined: set, entry: Any, path: JsonPath) -> None:
    if not isinstance(entry, dict):
        raise checker.fail(path, f"must be a JSON object, got {_short(entry)}")
    predecessors = checker.names(entry, path, "predecessors")
    missing = [name for name in predecessors if name not in defined]
    if missing:
        raise checker.fail((*path, "predecessors"), f"reads undefined vertices {missing}")
    checker.field(entry, path, "qualified_name", (str, type(None)), "a string or null",
                  required=False)
    _define(checker, defined, entry, path)
    _check_module(checker, checker.field(entry, path, "module", (dict,), "a JSON object"),
                  (*path, "module"))


def _check_module(checker: _Checker, spec: dict, path: JsonPath) -> None:
    kind = checker.field(spec, path, "kind", (str,), "a module kind")
    if kind not in _MODULE_KINDS:
        raise checker.fail((*path, "kind"), f"must be one of {', '.join(_MODULE_KINDS)}, got "
                                            f"{_short(kind)}")
    if kind == "dag":
        _check_graph(checker, checker.field(spec, path, "dag", (dict,), "a JSON object"),
                     (*path, "dag"))
    elif kind == "module_call":
        _check_module(checker, checker.field(spec, path, "module", (dict,), "a JSON object"),
                      (*path, "module"))
        for key in ("args", "kwargs"):
            if key not in spec:
                raise checker.fail((*path, key), "is missing")
    elif kind == "op":
        checker.field(spec, path, "type", (str,), "an op type name")
        checker.field(spec, path, "config", (dict,), "a JSON object")
    elif spec.get("type") == "parametrized":  # see dagprune.parametrized
        checker.field(spec, path, "base", (dict,), "a module description")
        checker.field(spec, path, "parametrizations", (list,), "a list of [tensor name, parametrizations]")
    else:
        checker.field(spec, path, "type", (str,), "a module type name")
        if ("config" in spec) == ("structure" in spec):
            raise checker.fail(path, "must hold exactly one of 'config' and 'structure'")
        checker.field(spec, path, "structure", (dict,), "a JSON object", required=False)


def _check_shared(checker: _Checker, shared: dict) -> None:
    for kind in shared:
        if kind not in _SHARED_KINDS:
            raise checker.fail(("shared", kind), f"is not one of {', '.join(_SHARED_KINDS)}")
        groups = checker.field(shared, ("shared",), kind, (list,), "a list of path groups")
        for index, group in enumerate(groups):
            if not isinstance(group, list) or len(group) < 2 or not all(
                    isinstance(member, str) and member for member in group):
                raise checker.fail(("shared", kind, index),
                                   f"must list two or more paths, got {_short(group)}")


# --------------------------------------------------------------------------------- naming
def format_field_path(path: JsonPath) -> str:
    """``("graph", "vertices", 3, "module")`` as ``"graph.vertices[3].module"``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<document>"


def _vertex_name_at(document: Any, path: JsonPath) -> str | None:
    """The name of the innermost vertex whose entry contains ``path``, if it has a name."""
    name, value = None, document
    for position, part in enumerate(path):
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            break
        if position >= 1 and path[position - 1] == "vertices" and isinstance(part, int) and \
                isinstance(value, dict) and isinstance(value.get("name"), str):
            name = value["name"]
    return name


def _short(value: Any) -> str:
    if type(value) is int and value.bit_length() > 64:
        return f"{'-' if value < 0 else ''}<an integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
