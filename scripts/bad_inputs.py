#!/usr/bin/env python
"""A catalogue of bad inputs, and what dagprune answers to each.

    python scripts/bad_inputs.py                  # every case; writes resources/bad_inputs.md
    python scripts/bad_inputs.py --cases lr_negative load_truncated_tensors --no-write

Each case is a ``dagprune`` command line (options, model names, data folders, saved DAG
directories) or a few lines of Python calling the library the wrong way, with the files it
needs created in a temporary directory. Each runs in its own process, with a timeout and a
bound on the memory it may allocate, so a case that hangs or tries to allocate a huge tensor
cannot take the machine down. The table gives, for each case, the exit code (commands) or the
exception type (Python), the first line of the message, and whether the answer is the one a
user should get: for a bad input, exit code 2 or a ``dagprune.errors.DagpruneError``, with a
one-line message and no traceback.

``tests/test_bad_inputs.py`` runs a few of these cases in-process (:func:`run_in_process`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "resources" / "bad_inputs.md"
TIMEOUT_S = 300
MEMORY_BOUND_BYTES = 8 * 2 ** 30
QUICK = ["--steps", "2", "--baseline-steps", "1", "--finetune-steps", "1", "--limit-train", "32",
         "--limit-val", "16", "--batch-size", "16", "--image-size", "16", "--no-progress", "--no-reference"]
"""``dagprune prune`` options of a run of seconds, for the cases that get as far as training."""

PACKAGE_ERROR = "DagpruneError"
"""The expected answer of a Python case: an exception deriving from ``dagprune.errors.DagpruneError``."""


@dataclass
class Case:
    """One bad input.

    Attributes:
        name: a short identifier (``--cases`` takes it).
        description: what is wrong, for the table.
        command: the ``dagprune`` arguments, or None for a Python case; ``{work}`` is the
            temporary directory.
        code: the Python of a Python case (``{work}`` as above).
        setup: creates the files the case needs in the temporary directory.
        expected: the right answer: an exit code, or :data:`PACKAGE_ERROR`.
    """

    name: str
    description: str
    command: list[str] | None = None
    code: str | None = None
    setup: Callable[[Path], None] | None = None
    expected: int | str = 2


@dataclass
class Outcome:
    """What a case gave: ``result`` is "exit N", an exception's qualified type, "no error",
    "timeout" or "killed by signal N"; ``message`` the first line of its message."""

    result: str
    message: str
    as_expected: bool
    traceback: bool = False
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- files the cases use
def write_file(work: Path) -> None:
    (work / "a_file").write_text("not a directory\n")


def write_saved_dag(work: Path, name: str = "dag") -> Path:
    """A small saved DAG (a conv, a relu call, a mean, an add and a linear layer)."""
    import torch
    from torch import nn

    import dagprune

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.linear = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.linear(torch.relu(self.conv(x)).mean((2, 3)) + 1)

    return Path(dagprune.build_from_unstructured_module(Small()).save(work / name))


def edit_graph(work: Path, edit: Callable[[dict], None]) -> None:
    """Saves the small DAG, then rewrites its graph.json with ``edit``."""
    path = write_saved_dag(work) / "graph.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def vertex(document: dict, name: str) -> dict:
    return next(v for v in document["graph"]["vertices"] if v["name"] == name)


def truncate_tensors(work: Path) -> None:
    path = write_saved_dag(work) / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def flip_a_tensor_byte(work: Path) -> None:
    path = write_saved_dag(work) / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def write_image_folder(work: Path, intact: int, corrupt: int, classes=("cat", "dog")) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (work / "images" / name).mkdir(parents=True)
        for index in range(intact):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(work / "images" / name / f"{index}.png")
        for index in range(corrupt):
            (work / "images" / name / f"broken{index}.jpg").write_bytes(rng.bytes(200))


def write_truncated_idx(work: Path) -> None:
    import struct

    folder = work / "mnist"
    folder.mkdir()
    for stem, dims in (("train-images-idx3-ubyte", (10, 28, 28)), ("t10k-images-idx3-ubyte", (5, 28, 28)),
                       ("train-labels-idx1-ubyte", (10,)), ("t10k-labels-idx1-ubyte", (5,))):
        header = struct.pack(">BBBB", 0, 0, 8, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
        (folder / stem).write_bytes(header + bytes(20))


def write_checkpoints(work: Path) -> None:
    """A checkpoint holding a non-tensor object, and a state dict of another model."""
    import torch

    torch.save({"model": {}, "arguments": argparse.Namespace(lr=1.0)}, work / "pickled.pt")
    torch.save({"model": torch.nn.Linear(3, 2).state_dict()}, work / "other_model.pt")


def write_saved_dag_and_file(work: Path) -> None:
    write_saved_dag(work)
    write_file(work)


# --------------------------------------------------------------------------- the catalogue
def prune(*options: str) -> list[str]:
    return ["prune", *QUICK, "--out", "{work}/run", *options]


SMALL_DAG = ("import dagprune, torch\nfrom torch import nn\n"
             "dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), "
             "nn.Conv2d(4, 4, 3)))\n")
PRUNING = SMALL_DAG + "from dagprune_algorithms.pruning import ChannelPruning\n"

CASES = [
    Case("lr_negative", "--lr below 0", prune("--lr", "-1")),
    Case("gate_lr_negative", "--gate-lr below 0", prune("--gate-lr", "-1")),
    Case("lr_nan", "--lr nan", prune("--lr", "nan")),
    Case("device_unknown", "--device that does not exist", prune("--device", "foo")),
    Case("seed_negative", "--seed below 0", prune("--seed", "-1")),
    Case("limit_train_zero", "--limit-train 0", prune("--limit-train", "0")),
    Case("limit_val_zero", "--limit-val 0", prune("--limit-val", "0")),
    Case("block_size_zero", "--block-size 0", prune("--block-size", "0")),
    Case("batch_size_zero", "--batch-size 0", prune("--batch-size", "0")),
    Case("target_above_one", "--target 1.5", prune("--target", "1.5")),
    Case("target_unreachable", "--target below what removing every prunable channel gives",
         prune("--target", "0.001")),
    Case("block_size_huge", "--block-size larger than every channel group", prune("--block-size", "4096")),
    Case("target_missed", "--target 0.2 with --block-size 16: the pruned model misses the target (a failed check)",
         prune("--target", "0.2", "--block-size", "16"), expected=1),
    Case("steps_not_a_number", "--steps abc", prune("--steps", "abc")),
    Case("image_size_huge", "--image-size 100000 (terabytes of images)", prune("--image-size", "100000")),
    Case("image_size_too_small", "--image-size below a ViT's patch size", prune("--model", "test_vit",
                                                                                 "--image-size", "4")),
    Case("out_is_a_file", "--out names a file", ["prune", *QUICK, "--out", "{work}/a_file"], setup=write_file),
    Case("out_below_a_file", "--out below a file", ["prune", *QUICK, "--out", "{work}/a_file/run"],
         setup=write_file),
    Case("l1_option_without_l1", "--prune-times without --method l1", prune("--prune-times", "2")),
    Case("ratio_out_of_range", "--target-pruning-ratio 1.5", prune("--method", "l1", "--target-pruning-ratio",
                                                                   "1.5")),
    Case("baseline_missing", "--baseline-checkpoint that does not exist",
         prune("--baseline-checkpoint", "{work}/missing.pt")),
    Case("baseline_pickled_object", "--baseline-checkpoint holding a pickled object",
         prune("--baseline-checkpoint", "{work}/pickled.pt"), setup=write_checkpoints),
    Case("baseline_other_model", "--baseline-checkpoint of another model",
         prune("--baseline-checkpoint", "{work}/other_model.pt"), setup=write_checkpoints),
    Case("prune_unknown_model", "prune --model with a typo", prune("--model", "resnet181")),
    Case("convert_unknown_model", "convert with a typo in the model name", ["convert", "resnet181"]),
    Case("units_unknown_model", "units of an unknown model", ["units", "no_such_model"]),
    Case("units_output_below_a_file", "units -o below a file",
         ["units", "test_resnet", "--input-size", "3", "16", "16", "-o", "{work}/a_file/units.json"],
         setup=write_file),
    Case("data_dir_missing", "--data-dir that does not exist", prune("--data-dir", "{work}/nowhere")),
    Case("data_dir_is_a_file", "--data-dir names a file", prune("--data-dir", "{work}/a_file"), setup=write_file),
    Case("data_dir_one_class", "an image folder with one class",
         prune("--data-dir", "{work}/images"), setup=lambda work: write_image_folder(work, 4, 0, ("cat",))),
    Case("data_dir_all_corrupt", "an image folder whose images are all corrupt",
         prune("--data-dir", "{work}/images"), setup=lambda work: write_image_folder(work, 0, 3)),
    Case("data_dir_some_corrupt", "an image folder with 2 corrupt images of 22 (skipped with a warning)",
         prune("--data-dir", "{work}/images"), setup=lambda work: write_image_folder(work, 10, 1), expected=0),
    Case("data_dir_truncated_idx", "an MNIST folder whose IDX files are truncated",
         prune("--data-dir", "{work}/mnist"), setup=write_truncated_idx),
    Case("convert_truncated_tensors", "convert a saved DAG whose tensors file is truncated",
         ["convert", "{work}/dag", "--input-size", "3", "8", "8"], setup=truncate_tensors),
    Case("convert_a_file", "convert a path that is a file, not a saved DAG", ["convert", "{work}/a_file"],
         setup=write_file),
    Case("load_truncated_tensors", "load_dag: tensors file truncated",
         code="import dagprune\ndagprune.load_dag('{work}/dag')", setup=truncate_tensors, expected=PACKAGE_ERROR),
    Case("load_changed_tensor_bytes", "load_dag: a byte of the tensor data changed",
         code="import dagprune\ndagprune.load_dag('{work}/dag')", setup=flip_a_tensor_byte, expected=PACKAGE_ERROR),
    Case("load_missing_graph", "load_dag: graph.json missing",
         code="import dagprune\ndagprune.load_dag('{work}/dag')",
         setup=lambda work: (write_saved_dag(work) / "graph.json").unlink(), expected=PACKAGE_ERROR),
    Case("load_missing_tensors", "load_dag: tensors.safetensors missing",
         code="import dagprune\ndagprune.load_dag('{work}/dag')",
         setup=lambda work: (write_saved_dag(work) / "tensors.safetensors").unlink(), expected=PACKAGE_ERROR),
    Case("load_graph_not_json", "load_dag: graph.json is not JSON",
         code="import dagprune\ndagprune.load_dag('{work}/dag')",
         setup=lambda work: (write_saved_dag(work) / "graph.json").write_text("{not json"), expected=PACKAGE_ERROR),
    Case("load_vertices_wrong_type", "load_dag: graph.vertices is a number",
         code="import dagprune\ndagprune.load_dag('{work}/dag')",
         setup=lambda work: edit_graph(work, lambda d: d["graph"].update(vertices=5)), expected=PACKAGE_ERROR),
    Case("load_config_wrong_type", "load_dag: a Linear's in_features is a string",
         code="import dagprune\ndagprune.load_dag('{work}/dag')",
         setup=lambda work: edit_graph(work, lambda d: vertex(d, "linear")["module"]["config"]["dict"].update(
             in_features="four")), expected=PACKAGE_ERROR),
    Case("load_unknown_function", "load_dag: a call of os.system",
         code="import dagprune\ndagprune.load_dag('{work}/dag')",
         setup=lambda work: edit_graph(work, lambda d: vertex(d, "relu")["module"]["config"].update(
             function_name="os.system")), expected=PACKAGE_ERROR),
    Case("load_unknown_module_type", "load_dag: a module of type subprocess.Popen",
         code="import dagprune\ndagprune.load_dag('{work}/dag')",
         setup=lambda work: edit_graph(work, lambda d: vertex(d, "linear")["module"].update(
             type="subprocess.Popen")), expected=PACKAGE_ERROR),
    Case("load_huge_shape", "load_dag: a Linear declared with 10^12 input features",
         code="import dagprune\ndagprune.load_dag('{work}/dag')",
         setup=lambda work: edit_graph(work, lambda d: vertex(d, "linear")["module"]["config"]["dict"].update(
             in_features=10 ** 12)), expected=PACKAGE_ERROR),
    Case("load_unknown_predecessor", "load_dag: a vertex reads a vertex that does not exist",
         code="import dagprune\ndagprune.load_dag('{work}/dag')",
         setup=lambda work: edit_graph(work, lambda d: vertex(d, "linear").update(predecessors=["nowhere"])),
         expected=PACKAGE_ERROR),
    Case("load_future_version", "load_dag: a format version from the future",
         code="import dagprune\ndagprune.load_dag('{work}/dag')",
         setup=lambda work: edit_graph(work, lambda d: d.update(version=999)), expected=PACKAGE_ERROR),
    Case("load_missing_directory", "load_dag of a directory that does not exist",
         code="import dagprune\ndagprune.load_dag('{work}/nowhere')", expected=PACKAGE_ERROR),
    Case("save_onto_a_file", "save_dag onto a path that is a file",
         code=SMALL_DAG + "dag.save('{work}/a_file')", setup=write_file, expected=PACKAGE_ERROR),
    Case("pruning_not_a_dag", "ChannelPruning of a plain nn.Module",
         code=PRUNING + "ChannelPruning(nn.Conv2d(3, 4, 3), (3, 8, 8), 0.5, 10)", expected=PACKAGE_ERROR),
    Case("pruning_proportion_above_one", "ChannelPruning(pruning_proportion=1.5)",
         code=PRUNING + "ChannelPruning(dag, (3, 8, 8), 1.5, 10)", expected=PACKAGE_ERROR),
    Case("pruning_zero_steps", "ChannelPruning(num_training_steps=0)",
         code=PRUNING + "ChannelPruning(dag, (3, 8, 8), 0.5, 0)", expected=PACKAGE_ERROR),
    Case("pruning_wrong_input_shape", "ChannelPruning with an input shape the model cannot take",
         code=PRUNING + "ChannelPruning(dag, (5, 8, 8), 0.5, 10).prepare_for_pruning()", expected=PACKAGE_ERROR),
    Case("pruning_negative_step", "pruning losses at global_step=-1",
         code=PRUNING + "cfg = ChannelPruning(dag, (3, 8, 8), 0.5, 10)\ncfg.prepare_for_pruning()\n"
                        "cfg.compute_current_proportion_and_pruning_losses(global_step=-1)", expected=PACKAGE_ERROR),
    Case("remove_before_prepare", "remove_channels() before prepare_for_pruning()",
         code=PRUNING + "ChannelPruning(dag, (3, 8, 8), 0.5, 10).remove_channels()", expected=PACKAGE_ERROR),
    Case("convert_data_parallel", "build_from_unstructured_module(nn.DataParallel(model))",
         code="import dagprune\nfrom torch import nn\n"
              "dagprune.build_from_unstructured_module(nn.DataParallel(nn.Linear(2, 2)))", expected=PACKAGE_ERROR),
    Case("convert_compiled", "build_from_unstructured_module(torch.compile(model))",
         code="import dagprune, torch\nfrom torch import nn\n"
              "dagprune.build_from_unstructured_module(torch.compile(nn.Linear(2, 2)))", expected=PACKAGE_ERROR),
    Case("convert_scripted", "build_from_unstructured_module(torch.jit.script(model))",
         code="import dagprune, torch, warnings\nfrom torch import nn\nwarnings.simplefilter('ignore')\n"
              "dagprune.build_from_unstructured_module(torch.jit.script(nn.Linear(2, 2)))", expected=PACKAGE_ERROR),
    Case("convert_a_function", "build_from_unstructured_module of a function",
         code="import dagprune, torch\ndagprune.build_from_unstructured_module(torch.relu)", expected=PACKAGE_ERROR),
    Case("flops_negative_shape", "count_flops with a negative input size",
         code=SMALL_DAG + "dagprune.count_flops(dag, (3, -1, 8))", expected=PACKAGE_ERROR),
]


# --------------------------------------------------------------------------- running a case
_PYTHON_CASE_RUNNER = r'''
import sys
try:
    exec(compile(sys.argv[1], "<case>", "exec"), {"__name__": "__case__"})
except BaseException as error:
    from dagprune.errors import DagpruneError
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    print("\n@@raised " + type(error).__module__ + "." + type(error).__qualname__)
    print("@@package " + str(isinstance(error, DagpruneError)))
    print("@@lines " + str(len(lines)))
    print("@@message " + (lines[0] if lines else ""))
else:
    print("\n@@raised none")
'''


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_BOUND_BYTES, resource.RLIM_INFINITY))


def run_in_subprocess(case: Case, work: Path, timeout_s: float = TIMEOUT_S) -> Outcome:
    """Runs ``case`` in a new Python process (its files set up in ``work``)."""
    if case.setup is not None:
        case.setup(work)
    if case.command is not None:
        argv = [sys.executable, "-m", "dagprune_algorithms.app.cli", *_filled(case.command, work)]
    else:
        argv = [sys.executable, "-c", _PYTHON_CASE_RUNNER, case.code.replace("{work}", str(work))]
    started = time.perf_counter()
    environment = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    try:
        finished = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=work,
                                  env=environment, preexec_fn=_limit_memory if sys.platform == "linux" else None)
    except subprocess.TimeoutExpired:
        return Outcome("timeout", f"no answer within {timeout_s:.0f} s", False, seconds=timeout_s)
    seconds = time.perf_counter() - started
    if finished.returncode < 0:
        return Outcome(f"killed by signal {-finished.returncode}", _last_line(finished.stderr), False,
                       seconds=seconds)
    if case.command is not None:
        return _command_outcome(case, finished.returncode, finished.stderr, seconds)
    return _python_outcome(case, finished.stdout, finished.stderr, seconds)


def run_in_process(case: Case, work: Path) -> Outcome:
    """Runs ``case`` in this process (its files set up in ``work``); for the tests."""
    if case.setup is not None:
        case.setup(work)
    started = time.perf_counter()
    if case.command is not None:
        from dagprune_algorithms.app.cli import main

        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(_filled(case.command, work))
            except SystemExit as exited:
                code = exited.code
        return _command_outcome(case, code, stderr.getvalue(), time.perf_counter() - started)
    from dagprune.errors import DagpruneError

    try:
        exec(compile(case.code.replace("{work}", str(work)), "<case>", "exec"), {"__name__": "__case__"})
    except Exception as error:  # the outcome under test
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        kind = f"{type(error).__module__}.{type(error).__qualname__}"
        return Outcome(kind, lines[0] if lines else "", isinstance(error, DagpruneError) and len(lines) == 1,
                       seconds=time.perf_counter() - started)
    return Outcome("no error", "", False, seconds=time.perf_counter() - started)


def _filled(command: list[str], work: Path) -> list[str]:
    return [part.replace("{work}", str(work)) for part in command]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _command_outcome(case: Case, code: int, stderr: str, seconds: float) -> Outcome:
    """The message of a command is its ``dagprune ...: error`` line (logs come before it), the
    exception line after a traceback, or else the last line it printed on stderr."""
    traceback = "Traceback (most recent call last)" in stderr
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines
              if line.startswith("dagprune") and (": error:" in line or ": check failed:" in line)]
    warnings = [line for line in lines if line.startswith("skipped")]
    if errors:
        message = errors[0]
    elif warnings and not traceback:
        message = warnings[0]
    else:
        message = lines[-1] if lines else ""
    return Outcome(f"exit {code}", message, code == case.expected and not traceback, traceback, seconds)


def _python_outcome(case: Case, stdout: str, stderr: str, seconds: float) -> Outcome:
    report = dict(line[2:].split(" ", 1) for line in stdout.splitlines() if line.startswith("@@") and " " in line)
    raised = report.get("raised", "no answer")
    if raised == "none":
        return Outcome("no error", "", False, seconds=seconds)
    if raised == "no answer":
        return Outcome("crashed", _last_line(stderr), False, True, seconds)
    one_line = report.get("lines") == "1"
    return Outcome(raised, report.get("message", ""), report.get("package") == "True" and one_line,
                   seconds=seconds)


# --------------------------------------------------------------------------- the report
def format_table(results: list[tuple[Case, Outcome]]) -> str:
    """The markdown report of ``results``."""
    good = sum(outcome.as_expected for _, outcome in results)
    lines = [
        "# Bad inputs and what dagprune answers",
        "",
        "Generated by `python scripts/bad_inputs.py` (rerun it to refresh this file); each case runs in",
        f"its own process, with a timeout of {TIMEOUT_S} s and allocations bounded at "
        f"{MEMORY_BOUND_BYTES // 2 ** 30} GiB. A command should",
        "exit with 2 (1 for a failed check, 0 where the input is usable, as noted) and print one line, no",
        "traceback; a Python call should raise a `dagprune.errors.DagpruneError` with a one-line message.",
        "`WORK` stands for the case's temporary directory; commands that get as far as training run",
        f"tiny budgets (`QUICK` = `{' '.join(QUICK)}`).",
        "",
        f"{good} of {len(results)} cases give the expected answer.",
        "",
        "| # | case | command or call | exit code or exception | first line of the message | expected |",
        "|---:|---|---|---|---|---|",
    ]
    for index, (case, outcome) in enumerate(results, 1):
        call = ("dagprune " + " ".join(case.command) if case.command is not None
                else case.code.strip().splitlines()[-1])
        call = call.replace(" ".join(QUICK), "QUICK").replace("{work}", "WORK")
        verdict = "yes" if outcome.as_expected else "**no**" + (" (traceback)" if outcome.traceback else "")
        expected = "exception" if case.expected == PACKAGE_ERROR else f"exit {case.expected}"
        lines.append(f"| {index} | {case.description} | `{_cell(call)}` | {_cell(outcome.result)} | "
                     f"{_cell(outcome.message)} | {verdict} ({expected}) |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 400 else text[:397] + "..."


def run_catalogue(cases: list[Case], timeout_s: float = TIMEOUT_S) -> list[tuple[Case, Outcome]]:
    """Runs ``cases`` one after the other, each in a fresh temporary directory; prints progress."""
    results = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix=f"bad-input-{case.name}-") as work:
            outcome = run_in_subprocess(case, Path(work), timeout_s)
            outcome.message = outcome.message.replace(work, "WORK")
        results.append((case, outcome))
        print(f"{case.name:32s} {outcome.result:40s} {'ok' if outcome.as_expected else 'NOT AS EXPECTED'} "
              f"({outcome.seconds:.1f} s) {outcome.message[:100]}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", metavar="NAME", help="run only these cases")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {REPORT.relative_to(REPO)}")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per case")
    options = parser.parse_args(argv)
    by_name = {case.name: case for case in CASES}
    unknown = sorted(set(options.cases or ()) - set(by_name))
    if unknown:
        parser.error(f"unknown cases {', '.join(unknown)}; known: {', '.join(by_name)}")
    results = run_catalogue([by_name[name] for name in options.cases] if options.cases else CASES, options.timeout)
    if not options.no_write:
        REPORT.write_text(format_table(results))
        print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
