"""How a save puts a DAG into a directory so that, at every instant, a complete DAG loads from it.

A saved DAG is a directory holding :data:`GRAPH_FILE`, which records the SHA-256 digest of its
tensor file, and that tensor file, found under one of two names: ``tensors.safetensors``
(:data:`TENSORS_FILE`), or ``tensors.<first 16 hex digits of the digest>.safetensors`` while a
save is replacing a previous one. The loader tries the digest's own name first, then
``tensors.safetensors``, and uses the first whose digest matches. So the one small graph file
decides which DAG loads, and replacing it with :func:`os.replace` (atomic) switches DAGs.

A save into a path that does not exist writes both files into a staging directory beside it
(``.<name>.saving-<random>``) and renames that directory into place: the directory appears
complete, or not at all.

A save into an existing directory (a previous save, or an empty directory) works in place and
touches only its own files:

1. The tensors are written to a hidden staging file (``.tensors.<random>.saving``), flushed to
   disk and renamed to ``tensors.<digest>.safetensors``. ``graph.json`` still records the
   previous digest, so the previous DAG still loads.
2. The new graph is written to ``.graph.json.<random>.saving``, flushed and renamed over
   ``graph.json``. This is the commit: from now on the new DAG loads, from the versioned file.
3. The versioned file is renamed over ``tensors.safetensors`` (the new DAG now loads from
   there), and a versioned file the previous graph used, if any, is removed.

A failure before the commit removes the staging files and the versioned file (unless the
previous graph uses it) and leaves the previous DAG. A failure in step 3 leaves the new DAG
loadable from its versioned file and warns. A save killed outright can leave a hidden
``*.saving`` file, or before its commit an unused versioned tensor file; neither affects
loading, and no save deletes them, since a save deletes only what it wrote or what the graph it
replaces used. Other files in the directory are never touched, and a directory that holds other
files but no dagprune ``graph.json`` is refused. Files and directories are created with the
default modes, so they follow the umask.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import warnings
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch

from dagprune.errors import SerializationError
from dagprune.saved_graph import FORMAT_NAME, MAX_GRAPH_BYTES

__all__ = ["GRAPH_FILE", "TENSORS_FILE", "write_dag_files", "tensor_file_candidates",
           "file_sha256"]

GRAPH_FILE = "graph.json"
TENSORS_FILE = "tensors.safetensors"
_STAGING_SUFFIX = ".saving"
_LEFTOVER_NAME = re.compile(r"(\..*\.saving(-[0-9a-f]+)?|tensors\.[0-9a-f]{16}\.safetensors)")


def file_sha256(file: Path) -> str:
    """The SHA-256 digest of ``file``, as 64 lowercase hex digits."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_file_candidates(directory: Path, digest: str) -> list[Path]:
    """The files that may hold the tensors whose SHA-256 is ``digest``, in the order to try.

    >>> [p.name for p in tensor_file_candidates(Path("model"), "0123456789abcdef" * 4)]
    ['tensors.0123456789abcdef.safetensors', 'tensors.safetensors']
    """
    return [directory / _versioned_name(digest), directory / TENSORS_FILE]


def write_dag_files(path: Path, tensors: dict[str, torch.Tensor],
                    document_for: Callable[[str], dict]) -> None:
    """Saves ``tensors`` and the graph ``document_for(tensor digest)`` to the directory ``path``.

    Args:
        path: the directory: absent, empty, or holding a previous save (and perhaps other files).
        tensors: contiguous CPU tensors by name.
        document_for: builds the JSON document of ``graph.json`` from the tensor file's digest.

    Raises:
        SerializationError: ``path`` is a file, or a directory holding other files but no
            dagprune graph; nothing is written.
        OSError: writing failed; the previous save (if any) still loads and no staging file is
            left.
    """
    _refuse_foreign(path)
    if path.is_dir():
        _update_in_place(path, tensors, document_for)
    else:
        _create_directory(path, tensors, document_for)


# --------------------------------------------------------------------------------- checks
def _refuse_foreign(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise SerializationError(f"{path} exists and is a file, not a saved DAG; refusing to "
                                 "overwrite it: choose another path or remove the file")
    if not path.is_dir():
        return
    if (path / GRAPH_FILE).exists():
        if _previous_graph(path) is None:
            raise SerializationError(f"{path / GRAPH_FILE} is not a dagprune graph; refusing to "
                                     "overwrite it: choose another directory")
    elif any(not _LEFTOVER_NAME.fullmatch(entry.name) for entry in path.iterdir()):
        raise SerializationError(f"{path} exists and is not a saved DAG; refusing to overwrite "
                                 "it: choose an empty or new directory")


def _previous_graph(directory: Path) -> dict | None:
    """The document of the directory's ``graph.json`` if that is a dagprune graph, else None."""
    graph_file = directory / GRAPH_FILE
    try:
        if not graph_file.is_file() or graph_file.stat().st_size > MAX_GRAPH_BYTES:
            return None
        document = json.loads(graph_file.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) and document.get("format") == FORMAT_NAME \
        else None


def _previous_tensor_file(directory: Path) -> Path | None:
    """The versioned tensor file the directory's current graph would load, if it names one."""
    document = _previous_graph(directory) or {}
    digest = document.get("tensors_sha256")
    if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest):
        return directory / _versioned_name(digest)
    return None


# --------------------------------------------------------------------------------- writing
def _create_directory(path: Path, tensors: dict[str, torch.Tensor],
                      document_for: Callable[[str], dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}{_STAGING_SUFFIX}-{secrets.token_hex(8)}"
    os.mkdir(staging)
    try:
        _write_tensors(staging / TENSORS_FILE, tensors)
        digest = file_sha256(staging / TENSORS_FILE)
        _write_synced(staging / GRAPH_FILE, _graph_bytes(document_for(digest)))
        _sync_directory(staging)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _sync_directory(path.parent)


def _update_in_place(directory: Path, tensors: dict[str, torch.Tensor],
                     document_for: Callable[[str], dict]) -> None:
    previous = _previous_tensor_file(directory)
    keep = {previous} if previous else set()
    written: list[Path] = []
    try:
        staged_tensors = _staging_file(directory, "tensors", written)
        _write_tensors(staged_tensors, tensors)
        digest = file_sha256(staged_tensors)
        versioned = directory / _versioned_name(digest)
        written.append(versioned)
        os.replace(staged_tensors, versioned)
        graph_data = _graph_bytes(document_for(digest))
        staged_graph = _staging_file(directory, GRAPH_FILE, written)
        _write_synced(staged_graph, graph_data)
    except BaseException:
        _remove_quietly([file for file in written if file not in keep])
        raise
    try:
        os.replace(staged_graph, directory / GRAPH_FILE)  # the commit
    except BaseException:
        if staged_graph.exists():  # not committed (else an interruption came just after it)
            _remove_quietly([file for file in written if file not in keep])
        raise
    _sync_directory(directory)
    _settle_tensor_file(directory, versioned, keep)


def _settle_tensor_file(directory: Path, versioned: Path, previous_files: set[Path]) -> None:
    """Step 3: moves the committed tensors to ``tensors.safetensors``; removes the previous
    versioned file. The new DAG loads before, during and after either rename."""
    try:
        os.replace(versioned, directory / TENSORS_FILE)
        for previous in previous_files - {versioned}:
            if previous.exists():
                os.unlink(previous)
        _sync_directory(directory)
    except OSError as error:
        warnings.warn(f"saved the DAG to {directory}, but could not rename {versioned.name} to "
                      f"{TENSORS_FILE} ({error}); the DAG loads from {versioned.name}, and the "
                      "next save to this directory renames it", RuntimeWarning, stacklevel=5)


def _staging_file(directory: Path, stem: str, written: list[Path]) -> Path:
    file = directory / f".{stem}.{secrets.token_hex(8)}{_STAGING_SUFFIX}"
    written.append(file)
    return file


def _versioned_name(digest: str) -> str:
    return f"tensors.{digest[:16]}.safetensors"


def _write_tensors(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Writes and flushes the tensor file, with the mode the umask gives new files (safetensors
    writes its files with mode 0600)."""
    with open(file, "xb") as placeholder:
        mode = stat.S_IMODE(os.fstat(placeholder.fileno()).st_mode)
    safetensors.torch.save_file(tensors, str(file), metadata={"format": FORMAT_NAME})
    os.chmod(file, mode)
    descriptor = os.open(file, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _graph_bytes(document: dict) -> bytes:
    return json.dumps(document, indent=1).encode()


def _write_synced(file: Path, data: bytes) -> None:
    with open(file, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_directory(directory: Path) -> None:
    """Makes the renames inside ``directory`` durable (where the platform can)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _remove_quietly(files: list[Path]) -> None:
    for file in files:
        try:
            os.unlink(file)
        except OSError:  # already gone, or cannot go: the error being raised matters more
            pass
