"""What the coverage sweeps share: ``scripts/coverage.py`` (timm), ``coverage_torchvision.py``
and ``coverage_transformers.py``.

* JSONL results: :func:`read_jsonl`, :func:`read_records` (the last record of a name wins),
  :func:`done_names`, :func:`append_record`;
* the child-process sweep (torchvision, transformers): each model runs as
  ``python SCRIPT --child NAME RECORD`` under a wall-clock timeout (:func:`run_in_subprocess`);
  the child (:func:`child_main`) rewrites its record after each stage, so a model that times out
  still reports the stages it finished; :func:`sweep` skips the names already in the results and
  appends one line per model;
* the fresh-interpreter load check (:func:`load_in_fresh_process`): the saved DAG loads with
  :func:`dagprune.load_dag` in a process that imports only torch and dagprune, where a library
  (torchvision, transformers) is either blocked (importing it raises ModuleNotFoundError, as if
  it were not installed) or only watched, and computes bit-equal outputs and state;
* error and table text: :func:`first_line`, :func:`last_line`, :func:`short_traceback`,
  :func:`mark`, :func:`escape`.

Only the standard library is imported at module level (torch inside the functions), so that the
fresh interpreter of the load check imports nothing but torch and dagprune besides this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
LOAD_TIMEOUT = 300  # seconds for the fresh interpreter of the load check
CONVERSION_TOLERANCE = 1e-5  # converts exactly: the DAG's output within this of the model's (max relative)
REMOVAL_TOLERANCE = 1e-4  # removal is exact: the slim model's output within this of the gated model's


# ------------------------------------------------------------------------------ error and table text
def first_line(error: BaseException) -> str:
    """``Type: first line of the message``, at most 400 characters."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:400]


def last_line(text: str) -> str:
    """The last non-blank line of ``text`` (a child's stderr), at most 300 characters."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def short_traceback(text: str, frames: int = 5) -> str:
    """The last ``frames`` frames and the error of a formatted traceback, without the frames of
    ``nn.Module.__call__``."""
    lines = [line for line in text.rstrip().splitlines() if "Traceback (most recent" not in line]
    blocks, current = [], []
    for line in lines:
        if line.startswith("  File ") and current:
            blocks.append(current)
            current = []
        current.append(line)
    blocks.append(current)
    kept = [block for block in blocks if "torch/nn/modules/module.py" not in block[0]]
    return "\n".join(line for block in kept[-frames - 1:] for line in block)[-3000:]


def mark(value) -> str:
    """A table cell for a check: yes, **no**, or - (not reached)."""
    return {True: "yes", False: "**no**", None: "-"}[value]


def escape(text: str) -> str:
    """``text`` fit for one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------------- JSONL results
def read_jsonl(path: Path, tolerant: bool = False) -> list[dict]:
    """The records of a JSONL file, in order (blank lines skipped). ``tolerant``: also skip the
    lines an interruption cut (not JSON, or without a name) instead of raising."""
    records = []
    for line in path.read_text().splitlines():
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if tolerant:
                continue
            raise
        if tolerant and "name" not in record:
            continue
        records.append(record)
    return records


def read_records(path: Path, tolerant: bool = False) -> dict[str, dict]:
    """Name -> record; the last record of a name wins (a rerun supersedes the old one)."""
    return {record["name"]: record for record in read_jsonl(path, tolerant)}


def done_names(path: Path, tolerant: bool = False) -> set[str]:
    """The names that have a record in ``path`` (none when it does not exist)."""
    return set(read_records(path, tolerant)) if path.exists() else set()


def append_record(path: Path, record: dict, sort_keys: bool = False) -> None:
    """One ``write`` per line with O_APPEND, so processes can share the file."""
    line = (json.dumps(record, sort_keys=sort_keys) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


# -------------------------------------------------------------------------- the child-process sweep
def parse_sweep_arguments(description: str, *, results: Path, table: Path, timeout: float,
                          models_help: str = "fnmatch patterns",
                          extra: Callable[[argparse.ArgumentParser], object] | None = None):
    """The command line of a child-process sweep: ``--models``, ``--results``, ``--table``,
    ``--timeout``, the options ``extra(parser)`` adds, ``--table-only`` and ``--note``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="*", default=["*"], help=models_help)
    parser.add_argument("--results", type=Path, default=results)
    parser.add_argument("--table", type=Path, default=table)
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per model")
    if extra is not None:
        extra(parser)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--note", default="", help="appended to the summary line")
    return parser.parse_args()


def matching(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The names that match one of the fnmatch ``patterns``, in their order."""
    patterns = list(patterns)
    return [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]


Check = Callable[..., object]
"""``check(name, report)``: runs every stage on ``name``, calling ``report(**fields)`` as each
result is known."""
ErrorFields = Callable[[BaseException, dict], dict]
"""``error_fields(error, record)``: the fields that record ``error``, called in its ``except``
block (``traceback.format_exc()`` works), with the record so far."""


def child_main(check: Check, error_fields: ErrorFields) -> bool:
    """When this process is a sweep's child (``SCRIPT --child NAME RECORD``): imports dagprune
    from this checkout, runs :func:`run_child` and returns True; else False."""
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.path.insert(0, str(REPO_ROOT))
        run_child(sys.argv[2], Path(sys.argv[3]), check, error_fields)
        return True
    return False


def run_child(name: str, record_path: Path, check: Check, error_fields: ErrorFields) -> None:
    """Checks ``name``, rewriting ``record_path`` (JSON) with the record after every field, then
    its ``seconds``; an exception is recorded with ``error_fields``."""
    record: dict = {"name": name}

    def report(**fields):
        record.update(fields)
        record_path.write_text(json.dumps(record))

    start = time.time()
    try:
        check(name, report)
    except Exception as error:  # noqa: BLE001 - recorded as the model's failure
        report(**error_fields(error, record))
    report(seconds=round(time.time() - start, 1))


def run_in_subprocess(script: str | Path, name: str, timeout: float, temp_prefix: str,
                      record_failed_stage: bool = False) -> dict:
    """The record of ``python script --child name RECORD`` run under ``timeout`` seconds: what
    the child wrote, with ``error`` when it timed out or died (and ``failed_stage``, the stage it
    was in, when ``record_failed_stage``)."""
    with tempfile.TemporaryDirectory(prefix=temp_prefix) as folder:
        record_path = Path(folder) / "record.json"
        start = time.time()
        try:
            subprocess.run([sys.executable, str(script), "--child", name, str(record_path)],
                           timeout=timeout, capture_output=True, check=False)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        record = json.loads(record_path.read_text()) if record_path.exists() else {"name": name}
    failure = None
    if timed_out:
        failure = f"timed out after {timeout:.0f} s in stage {record.get('stage')}"
    elif "seconds" not in record and "error" not in record:
        failure = f"child process died in stage {record.get('stage')}"
    if failure is not None:
        record["error"] = failure
        if record_failed_stage:
            record["failed_stage"] = record.get("stage")
    record.setdefault("seconds", round(time.time() - start, 1))
    return record


def sweep(names: Iterable[str], results: Path, run_one: Callable[[str], dict]) -> None:
    """``run_one(name)`` for every name without a record in ``results``; appends each record
    and prints it (without its traceback)."""
    results.parent.mkdir(parents=True, exist_ok=True)
    done = done_names(results)
    for name in names:
        if name in done:
            continue
        record = run_one(name)
        append_record(results, record)
        print(json.dumps({k: v for k, v in record.items() if k != "traceback"}), flush=True)


# ------------------------------------------------------------------ the fresh-interpreter load check
# argv: the checkout, scripts/, the folder with dag/ and expected.pt, the library, block|watch,
# the saving process's torch thread count (results can differ in the last bit between thread
# counts, e.g. in attention's reductions, so the child computes with the same number)
_LOAD_CHECK = """
import importlib.abc, sys
library, blocked, threads = sys.argv[4], sys.argv[5] == "block", int(sys.argv[6])
class BlockLibrary(importlib.abc.MetaPathFinder):  # as if the library were not installed
    def find_spec(self, name, path=None, target=None):
        if name == library or name.startswith(library + "."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a saved DAG must load without it)")
if blocked:
    sys.meta_path.insert(0, BlockLibrary())
sys.path[:0] = sys.argv[1:3]
import torch, dagprune
from sweep_harness import compare_bit_for_bit
torch.set_num_threads(threads)
dag = dagprune.load_dag(sys.argv[3] + "/dag").eval()
expected = torch.load(sys.argv[3] + "/expected.pt")
with torch.no_grad():
    output = dag(*expected["args"], **expected["kwargs"])
same_output, same_state = compare_bit_for_bit(expected["output"], output, expected["state"], dag.state_dict())
print("OUTPUT_TYPE", getattr(output, "type_name", type(output).__name__))
print("ROUNDTRIP", same_output and same_state, "OUTPUT", same_output, "STATE", same_state)
print("IMPORTED", library in sys.modules)
"""


@dataclasses.dataclass
class FreshLoad:
    """What the fresh interpreter of :func:`load_in_fresh_process` found.

    Attributes:
        exact: whether the loaded DAG computed bit-equal outputs and state; None when the child
            failed before comparing (see ``stderr``).
        verdict: its ``ROUNDTRIP ... OUTPUT ... STATE ...`` line ("" when it failed).
        output_type: the class name of the loaded DAG's output.
        imported_library: whether the library was imported in the child (loading needed it).
        stderr: the child's standard error.
    """

    exact: bool | None
    verdict: str
    output_type: str
    imported_library: bool
    stderr: str


def load_in_fresh_process(dag, args: tuple = (), kwargs: dict | None = None, *, library: str,
                          block: bool, temp_prefix: str) -> FreshLoad:
    """Saves ``dag`` (put in eval mode) with its output on ``args`` and ``kwargs`` and its state,
    and loads it in a fresh interpreter where ``library`` is blocked (``block``) or only watched."""
    import torch
    kwargs = kwargs or {}
    dag.eval()
    with torch.no_grad():
        output = dag(*args, **kwargs)
    with tempfile.TemporaryDirectory(prefix=temp_prefix) as folder:
        dag.save(Path(folder) / "dag")
        torch.save({"args": tuple(args), "kwargs": kwargs, "output": named_tensors(output),
                    "state": dag.state_dict()}, Path(folder) / "expected.pt")
        result = subprocess.run([sys.executable, "-c", _LOAD_CHECK, str(REPO_ROOT), str(SCRIPTS), folder,
                                 library, "block" if block else "watch", str(torch.get_num_threads())],
                                capture_output=True, text=True, timeout=LOAD_TIMEOUT, check=False)
    lines = result.stdout.splitlines()
    verdict = next((line for line in lines if line.startswith("ROUNDTRIP ")), "")
    return FreshLoad(
        exact=True if verdict.startswith("ROUNDTRIP True") else False if verdict else None,
        verdict=verdict,
        output_type=next((line.split()[1] for line in lines if line.startswith("OUTPUT_TYPE")), ""),
        imported_library="IMPORTED True" in lines,
        stderr=result.stderr)


def named_tensors(value, path: str = "output") -> list:
    """The tensors of an output (nested dicts, tuples, lists), named by where they sit."""
    import torch
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    if isinstance(value, dict):
        return [t for key, item in value.items() for t in named_tensors(item, f"{path}.{key}")]
    if isinstance(value, (tuple, list)):
        return [t for index, item in enumerate(value) for t in named_tensors(item, f"{path}[{index}]")]
    return []


def compare_bit_for_bit(expected_output, output, expected_state: dict, state: dict) -> tuple[bool, bool]:
    """Whether ``output`` holds the tensors of ``expected_output`` (an output, or its
    :func:`named_tensors`) under the same names and dtypes, bit for bit; and whether the two
    state dicts are equal bit for bit."""
    import torch
    expected = expected_output if isinstance(expected_output, list) else named_tensors(expected_output)
    actual = named_tensors(output)
    same_output = [name for name, _ in expected] == [name for name, _ in actual] and all(
        e.dtype == a.dtype and torch.equal(e, a) for (_, e), (_, a) in zip(expected, actual))
    same_state = expected_state.keys() == state.keys() and all(
        torch.equal(value, state[key]) for key, value in expected_state.items())
    return same_output, same_state
