"""The output directory of ``dagprune prune`` and the run it holds.

A run records the arguments that decide its results in ``run.json`` before it trains. A later
run on the same directory with the same arguments resumes from the checkpoints (or, when the
run had finished, reports it again without training); one with different arguments is refused
with a message naming them, so that checkpoints of one run never end up in the results of
another.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from dagprune_algorithms.app.prune_arguments import PruneUsageError
from dagprune_algorithms.app.report import write_json_report

__all__ = ["RUN_FILE", "RESULT_FILES", "run_identity", "check_run_matches", "record_run"]

RUN_FILE = "run.json"
"""The file of the output directory naming the arguments of the run it holds."""

RESULT_FILES = ("baseline_training.ckpt", "baseline.pt", "pruning.ckpt", "l1_pruning.ckpt",
                "finetune.ckpt", "reference.ckpt", "pruned", "report.json")
"""What a run writes into its output directory, in the order it writes them."""

_OPTIONS_WITHOUT_EFFECT = frozenset({"run", "command", "out", "checkpoint_every", "no_progress", "no_reference",
                                     "distributed"})
"""Arguments that do not change any result: the directory itself, how often checkpoints are
written (resuming is bit-exact), progress bars, the reference row (trained apart), and
``--distributed`` (one process in a group computes what it computes alone)."""

PROCESSES = "processes"
"""The entry of the identity of a run of several processes: their number, which decides how each
batch is shared out (absent for one process)."""

_FILE_OPTIONS = ("baseline_checkpoint", "target_pruning_ratio", "checkpoint")
"""Options naming a file whose content, not only its name, decides the results."""

_CONTENT_SUFFIX = "_sha256"


def run_identity(args: argparse.Namespace, processes: int = 1) -> dict:
    """The arguments of ``args`` that decide the results (validated, defaults filled in), with
    the SHA-256 of the files they name, and the number of ``processes`` when above 1, as plain
    JSON values."""
    identity = {name: value for name, value in sorted(vars(args).items()) if name not in _OPTIONS_WITHOUT_EFFECT}
    if processes > 1:
        identity[PROCESSES] = processes
    for name in _FILE_OPTIONS:
        value = identity.get(name)
        if isinstance(value, str) and (Path(value).is_file() or Path(value).is_dir()):
            identity[name + _CONTENT_SUFFIX] = _content_sha256(Path(value))
    return json.loads(json.dumps(identity))


def _content_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files (a saved DAG) with their relative paths."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def check_run_matches(out: Path, identity: dict) -> None:
    """Checks that ``out`` holds no results, or results of a run with the same ``identity``.

    Raises:
        PruneUsageError: ``out`` holds results of a run with other arguments (the message names
            each differing option with both values), or results without a ``run.json``.
    """
    found = [name for name in RESULT_FILES if (out / name).exists()]
    if not found:
        return
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise PruneUsageError(f"--out {out} holds {', '.join(found)} but no {RUN_FILE} naming the arguments "
                              "that made them; choose another --out, or delete them to start over there")
    differences = _differences(_read_identity(run_file), identity)
    if differences:
        raise PruneUsageError(f"--out {out} holds a run made with other arguments ({'; '.join(differences)}); "
                              "rerun with the same arguments to resume or report that run, or choose another "
                              "--out for this one")


def record_run(out: Path, identity: dict) -> None:
    """Creates ``out`` if needed and writes ``identity`` to its ``run.json`` (atomically);
    removes the temporary files of writes that a killed run left unfinished.

    Raises:
        PruneUsageError: ``out`` cannot be created or written.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        _remove_unfinished_writes(out)
        write_json_report(out / RUN_FILE, {"arguments": identity})
    except OSError as error:
        raise PruneUsageError(f"--out {out} cannot be written ({error.strerror or error}); choose a directory "
                              "you can write to") from error


def _remove_unfinished_writes(out: Path) -> None:
    """Deletes ``.<file>.<random>.tmp``, what a run killed while writing ``<file>`` leaves."""
    names = (*RESULT_FILES, RUN_FILE, "pruning.png")
    for path in out.glob(".*.tmp"):
        if path.is_file() and any(path.name.startswith(f".{name}.") for name in names):
            path.unlink()


def _read_identity(run_file: Path) -> dict:
    try:
        recorded = json.loads(run_file.read_text())["arguments"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise PruneUsageError(f"{run_file} cannot be read ({type(error).__name__}: {error}); choose another "
                              "--out, or delete that directory's files to start over there") from error
    if not isinstance(recorded, dict):
        raise PruneUsageError(f"{run_file} holds no arguments object; choose another --out")
    return recorded


def _differences(recorded: dict, current: dict) -> list[str]:
    """``"--seed 0 there, 1 now"`` for each option whose value differs, and which named file's
    content changed."""
    changed = [name for name in sorted(set(recorded) | set(current))
               if name not in recorded or name not in current or recorded[name] != current[name]]
    differences = []
    for name in changed:
        option = name.removesuffix(_CONTENT_SUFFIX)
        if option == name:
            there, now = (identity.get(name, 1 if name == PROCESSES else None) for identity in (recorded, current))
            differences.append(f"{_flag(name)} {_shown(there)} there, {_shown(now)} now")
        elif option not in changed:
            differences.append(f"the content of {_flag(option)} {current.get(option)} changed")
    return differences


def _flag(name: str) -> str:
    if name == PROCESSES:
        return "the number of processes (torchrun --nproc_per_node x --nnodes)"
    return "--" + name.replace("_", "-")


def _shown(value) -> str:
    return "(not given)" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
