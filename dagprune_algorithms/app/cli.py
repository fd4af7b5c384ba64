"""The ``dagprune`` command.

Each subcommand is two functions: ``_add_<name>_command(subparsers)`` declares its arguments and
sets ``run=<function>``; the function takes the parsed arguments and returns the exit code.
Adding a subcommand (``prune``, ``units``, ...) means writing those two functions and listing
the first in :data:`_COMMANDS`.

Exit codes: 0 success, 1 a check failed (the conversion is not exact, the round trip is not
bit-exact, the pruned model misses its FLOPs target), 2 a usage error, a dagprune error or an
unusable file, directory or device (printed as one line on stderr, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable, Sequence

import torch
from torch import nn

import dagprune
from dagprune.compare import describe_non_finite, non_finite_tensors
from dagprune.errors import DagpruneError
from dagprune.shape_prop import module_device, module_dtype, random_inputs

__all__ = ["main", "UsageError"]

EXACT_TOLERANCE = 1e-5
"""Largest difference, relative to the output scale, for a conversion to count as exact."""

_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
"""What torch raises when a device allocation fails."""


class UsageError(DagpruneError):
    """A command-line argument cannot be honoured (unknown model, unusable input size)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``dagprune`` command with ``argv`` (defaults to ``sys.argv[1:]``).

    Returns:
        The exit code (see the module docstring).
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except DagpruneError as error:
        return _print_error(args.command, str(error))
    except OSError as error:  # a full disk, a permission: the environment, not a bug
        return _print_error(args.command, f"{type(error).__name__}: {error}; check the path and the free space")
    except (MemoryError, _OUT_OF_MEMORY) as error:
        return _print_error(args.command, f"out of memory ({type(error).__name__}); lower the batch size or "
                                          "the input size")
    except KeyboardInterrupt:
        resume = "; rerun the same command to resume from its last checkpoint" if args.command == "prune" else ""
        print(f"dagprune {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


def _print_error(command: str, message: str) -> int:
    """Prints ``message`` as one line on stderr; returns the exit code of a usage or input error."""
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"dagprune {command}{_rank_label()}: error: {one_line}", file=sys.stderr)
    return 2


def _rank_label() -> str:
    """`` (rank R)`` in the processes of a torchrun launch other than rank 0, so that their errors
    are told apart; empty elsewhere."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" or os.environ.get("WORLD_SIZE", "1") == "1" else f" (rank {rank})"


class _OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser that reports a usage error as one line pointing at ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="dagprune", description="Convert, inspect and prune PyTorch models as DAGs.")
    parser.add_argument("--version", action="version", version=f"dagprune {dagprune.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


# --------------------------------------------------------------------------------- convert
def _add_convert_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a model to a DAG and check the conversion",
        description="Convert MODEL to a DagModule; print its summary, FLOPs and parameters, and "
                    "check that the conversion is exact and that a save/load round trip is "
                    "bit-exact.")
    parser.add_argument("model", metavar="MODEL",
                        help="a timm model name (created with pretrained=False) or a directory "
                             "holding a saved DAG")
    parser.add_argument("--input-size", type=int, nargs="+", default=[3, 224, 224],
                        metavar="DIM", help="input shape without batch (default: 3 224 224)")
    parser.add_argument("--save", metavar="DIR",
                        help="save the DAG to DIR (the round trip is checked from there)")
    parser.add_argument("--summary", action=argparse.BooleanOptionalAction, default=True,
                        help="print the vertex table (default: on)")
    parser.add_argument("--device", default="cpu",
                        help="where the conversion and round-trip checks run: cpu, cuda or cuda:N (default: cpu)")
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """``dagprune convert``: see :func:`_add_convert_command` for the arguments."""
    input_size = tuple(args.input_size)
    if any(dim <= 0 for dim in input_size):
        raise UsageError(f"--input-size must be positive, got {' '.join(map(str, input_size))}")
    from dagprune_algorithms.app.models import as_dag
    from dagprune_algorithms.app.prune_arguments import _check_device

    _check_device(args.device)
    original, description = _load_model(args.model, input_size)
    original.to(args.device)
    print(f"model: {description}, input {'x'.join(map(str, input_size))}")
    _check_model_runs(original, description, input_size)

    if isinstance(original, dagprune.DagModule):
        dag, conversion_seconds = original, None
    else:
        started = time.perf_counter()
        dag = as_dag(original, input_size, name=args.model)
        conversion_seconds = time.perf_counter() - started
    dag.eval()

    required_inputs = [vertex.name for vertex in dag.inputs if not vertex.has_default]
    if len(required_inputs) != 1:
        raise UsageError(f"{args.model} takes {len(required_inputs)} required inputs "
                         f"({', '.join(required_inputs)}); convert supports one input")
    if args.summary:
        print(dag.summary(dagprune.propagate_shapes(dag, input_size)))
    flops = dagprune.count_flops(dag, input_size)
    parameters = sum(p.numel() for p in dag.parameters())
    print(f"FLOPs: {flops.total:,} ({_kmapp_text(dag, input_size)}; FLOPs = 2 x "
          "multiply-adds of conv, linear, matmul and attention)")
    print(f"parameters: {parameters:,}")

    exact = True
    if conversion_seconds is None:
        print("conversion: not applicable (MODEL is a saved DAG)")
    else:
        difference = dagprune.compare_module_outputs(original, dag, (2, *input_size),
                                                     atol=EXACT_TOLERANCE, raise_error=False, device=args.device)
        exact = difference <= EXACT_TOLERANCE
        verdict = "exact" if exact else "NOT exact"
        print(f"conversion: {verdict} (max relative difference {difference:.3g}, tolerance "
              f"{EXACT_TOLERANCE:g}, eval mode, {len(dag.inner_vertices)} vertices, "
              f"{conversion_seconds:.2f} s){'' if exact else _non_finite_cause(original)}")

    round_trip_exact, where = _check_round_trip(dag, input_size, args.save)
    print(f"save/load round trip: {'bit-exact' if round_trip_exact else 'NOT bit-exact'} "
          f"({where})")
    return 0 if exact and round_trip_exact else 1


def _load_model(model: str, input_size: tuple[int, ...]) -> tuple[nn.Module, str]:
    """The model named by ``model`` (a saved DAG directory or a timm name), in eval mode."""
    if os.path.exists(model):
        return dagprune.load_dag(model).eval(), f"saved DAG {model}"
    from dagprune_algorithms.app.models import UnknownModelError, create_timm_model, timm_size_kwargs

    try:
        created = create_timm_model(model, input_size)
    except UnknownModelError as error:
        hint = f"; closest timm names: {', '.join(error.close_matches)}" if error.close_matches else ""
        raise UsageError(f"{model!r} is neither a saved DAG directory nor a timm model name{hint}") from error
    settings = ", ".join(f"{k}={v}" for k, v in timm_size_kwargs(model, input_size).items())
    return created.eval(), f"timm {model} (pretrained=False{', ' + settings if settings else ''})"


def _check_model_runs(model: nn.Module, name: str, input_size: tuple[int, ...]) -> None:
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, dtype=module_dtype(model), device=module_device(model)))
    except (RuntimeError, AssertionError, ValueError, IndexError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(f"{name} cannot run on an input of shape "
                         f"{'x'.join(map(str, input_size))}: {type(error).__name__}: "
                         f"{first_line}; choose another --input-size") from error


def _kmapp_text(dag: dagprune.DagModule, input_size: tuple[int, ...]) -> str:
    from dagprune_algorithms.pruning import compute_normalized_flops

    kmapp = compute_normalized_flops(dag, input_size)
    positions = "H x W" if len(input_size) == 3 else "positions"
    return f"{kmapp:.2f} kmapp = FLOPs / ({positions} x 1000)"


def _check_round_trip(dag: dagprune.DagModule, input_size: tuple[int, ...],
                      save_to: str | None) -> tuple[bool, str]:
    """Saves ``dag`` (to ``save_to`` or a temporary directory), loads it back, compares."""
    (example,) = random_inputs([(2, *input_size)], module_device(dag), module_dtype(dag))
    with torch.no_grad():
        expected = dag(example)
    with tempfile.TemporaryDirectory(prefix="dagprune-convert-") as scratch:
        path = dagprune.save_dag(dag, save_to or os.path.join(scratch, "dag"))
        loaded = dagprune.load_dag(path, map_location=module_device(dag)).eval()
        with torch.no_grad():
            actual = loaded(example)
    where = f"saved to {path}" if save_to else "through a temporary directory"
    exact = _outputs_equal(expected, actual)
    return exact, where + ("" if exact else _non_finite_cause(dag, expected))


def _non_finite_cause(model: nn.Module, output=None) -> str:
    """``"; non-finite values ..."`` naming the weights, statistics and outputs holding NaN
    or Inf, or ``""`` when every one is finite."""
    bad = non_finite_tensors(model)
    causes = [f"{len(bad)} weight or statistic tensor(s) hold NaN or Inf: {'; '.join(bad[:3])}"
              + (" ..." if len(bad) > 3 else "")] if bad else []
    causes += [text for text in (describe_non_finite(output, "the output"),) if text]
    if not causes:
        return ""
    return f"; non-finite values (never equal, not even to themselves): {'; '.join(causes)}"


def _outputs_equal(first, second) -> bool:
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return torch.equal(first, second)
    if isinstance(first, (tuple, list)) and isinstance(second, (tuple, list)):
        return len(first) == len(second) and all(map(_outputs_equal, first, second))
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(_outputs_equal(first[k], second[k])
                                                      for k in first)
    return first == second


# --------------------------------------------------------------------------------- prune
def _add_prune_command(subparsers) -> None:
    from dagprune_algorithms.app.prune_job import add_prune_arguments, run_prune

    parser = subparsers.add_parser(
        "prune", help="prune a timm model to a FLOPs target (or per-unit ratios) and report before/after",
        description="Train (or load) a baseline, prune it to --target of its FLOPs, fine-tune, "
                    "and print accuracy, FLOPs, parameters and latency (on --device) before and after. "
                    "--method l1 prunes iteratively (mmrazor's ItePruneAlgorithm): --prune-times "
                    "prunes every --step-epoch steps, to the FLOPs --target or to "
                    "--target-pruning-ratio (one fraction or a JSON file from `dagprune units MODEL "
                    "--choice -o FILE`), ranking channels by --importance. "
                    "Defaults run offline in minutes on CPU with scikit-learn's digits. "
                    "`torchrun --nproc_per_node N --no-python dagprune prune ...` trains on N processes "
                    "(DistributedDataParallel; rank 0 writes --out). "
                    "Every phase checkpoints into --out: rerunning the same command resumes an "
                    "interrupted run and gives the same result; a rerun on the same --out with "
                    "arguments that change the results is refused (exit 2). Exit codes: 0 "
                    "success, 1 the FLOPs target was missed (results saved), 2 a usage or input "
                    "error, printed as one line.")
    add_prune_arguments(parser)
    parser.set_defaults(run=run_prune)


# --------------------------------------------------------------------------------- units
def _add_units_command(subparsers) -> None:
    from dagprune_algorithms.app.units_command import add_units_arguments, run_units

    parser = subparsers.add_parser(
        "units", help="print a model's channel units as JSON (mmrazor's config template)",
        description="Print the channel units of MODEL (a timm name or a saved DAG) as a config "
                    "template or a choice template.")
    add_units_arguments(parser)
    parser.set_defaults(run=run_units)


_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_convert_command, _add_prune_command, _add_units_command)
"""The ``_add_<name>_command`` functions, in the order ``dagprune --help`` lists them."""


if __name__ == "__main__":
    sys.exit(main())
