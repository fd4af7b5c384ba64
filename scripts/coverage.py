"""Sweep timm's model zoo: conversion, channel groups, exact removal and FLOPs, one model per process.

For every name in ``timm.list_models()`` (``pretrained=False``) this records whether the model
converts exactly (:func:`dagprune.compare_module_outputs`), whether the DAG saves and loads
bit-exactly, whether it has prunable channel groups, ``prunable_proportion`` and
``max_removable_proportion``, whether removing channels under random gate logits reproduces the
gated model (and the slim model saves and loads bit-exactly), our FLOPs against fvcore's, the
parameter count and the time taken. Models holding blocks that tracing follows only with example
inputs are converted with an example batch, as the CLI converts them.

Each model runs in its own forked child process (torch, timm, dagprune and fvcore are imported
once in the parent) under a CPU-time bound (``RLIMIT_CPU``), a wall-clock bound (the parent
kills the child; a pause of the sweep, ``kill -STOP``, does not count) and an address-space
bound (``RLIMIT_AS``: the parent's address space plus ``--memory-gb``). Results are appended to
a JSONL file, one line per model; a rerun skips the names already there (resumable) and
``--shard i/n`` splits the names for parallel runs.

Models run at 64x64 where they can: fixed-size models (ViTs...) are rebuilt with
``img_size=64`` when timm allows; a model whose forward pass fails at 64 px is retried at its
``min_input_size``, 128 px and its default size. Parameters are counted on the meta device
first (no memory used): models over ``--large-params`` run in the large lane (one at a time
across shards, under ``--large-memory-gb``, longer time bounds, the DAG sharing the model's
weights); models over ``--max-params`` are skipped with the reason.

Usage::

    mkdir -p build/coverage/src && git archive HEAD dagprune dagprune_algorithms \
        | tar -x -C build/coverage/src && git rev-parse --short HEAD > build/coverage/src/COMMIT
    nice -n 15 python scripts/coverage.py --source build/coverage/src --shard 0/2 &
    nice -n 15 python scripts/coverage.py --source build/coverage/src --shard 1/2 &
    wait; python scripts/coverage_table.py    # writes resources/supported_models_table.md ...

After a fix, ``--rerun-failures --source <new snapshot>`` reruns only the names whose last
record failed (its new record supersedes the old one in the table).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import fnmatch
import hashlib
import multiprocessing
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]


def _source_root() -> Path:
    """Where dagprune is imported from: ``--source DIR`` (read before the imports below), else
    this checkout. A sweep takes hours; running it on a snapshot of a commit (``git archive``)
    keeps its records free of edits made to the working tree meanwhile."""
    if "--source" in sys.argv[:-1]:
        return Path(sys.argv[sys.argv.index("--source") + 1]).resolve()
    return REPO_ROOT


SOURCE_ROOT = _source_root()
sys.path.insert(0, str(SOURCE_ROOT))
sys.path.insert(1, str(REPO_ROOT / "tests"))  # make_weights_informative, shared with the test suite
sys.path.insert(2, str(Path(__file__).resolve().parent))  # removal_check, sweep_harness: shared with the other sweeps

import timm  # noqa: E402
from removal_check import (FLOAT64_REMOVAL_TOLERANCE, float64_removal_difference,  # noqa: E402
                           prepare_at_target_or_reachable, removal_difference_at_random_gates)
from sweep_harness import (CONVERSION_TOLERANCE, REMOVAL_TOLERANCE, append_record, done_names,  # noqa: E402
                           first_line, read_records)

import dagprune as dp  # noqa: E402
from dagprune_algorithms.app.models import create_timm_model  # noqa: E402
from informative_weights import make_weights_informative  # noqa: E402

DEFAULT_RESULTS = REPO_ROOT / "build" / "coverage" / "results.jsonl"
SMALL_SIDE = 64
FALLBACK_SIDES = (128,)
PRUNING_TARGET = 0.5
LARGE_TIME_FACTOR = 4
FVCORE_MATMUL_OPERATORS = ("conv", "linear", "matmul", "bmm", "addmm", "einsum")


# ------------------------------------------------------------------------------------ the check
def count_parameters_on_meta(name: str) -> int | None:
    """Parameter count of ``name`` built on the meta device (no memory, no init), or None."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is counted later
        return None


def candidate_sizes(name: str) -> list[tuple[tuple[int, int, int], bool]]:
    """``(input_size, rebuild)`` pairs to try, smallest first; ``rebuild``: pass img_size."""
    config = timm.models.get_pretrained_cfg(name)
    default = tuple(config.input_size) if config is not None else (3, 224, 224)
    fixed = bool(getattr(config, "fixed_input_size", False)) if config is not None else False
    sides = [SMALL_SIDE]
    minimum = getattr(config, "min_input_size", None) if config is not None else None
    if minimum is not None and minimum[1] > SMALL_SIDE:
        sides.append(minimum[1])
    sides += [side for side in FALLBACK_SIDES if side not in sides]
    sizes = [(3, side, side) for side in sides if side < default[1]]
    sizes.append(default)
    return [(size, fixed) for size in dict.fromkeys(sizes)]


def build_at_working_size(name: str, report) -> tuple[nn.Module, tuple[int, int, int]]:
    """The model (eval, informative weights) and the smallest tried input size it runs at."""
    model, last_error = None, None
    for input_size, rebuild in candidate_sizes(name):
        try:
            if model is None or rebuild:
                model = None
                torch.manual_seed(0)
                model = create_timm_model(name, input_size=input_size if rebuild else None)
                make_weights_informative(model).eval()
            with torch.no_grad():
                model(torch.randn(2, *input_size))
            report(input_size=list(input_size), img_size_rebuilt=rebuild)
            return model, input_size
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - try the next size, keep the reason
            if _is_out_of_memory(error):
                raise
            last_error = error
    raise last_error


def fvcore_flops(model: nn.Module, input_size) -> int:
    """2 x fvcore's multiply-accumulates of conv/linear/matmul-like operators (batch 1)."""
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, torch.randn(1, *input_size))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_operator = analysis.by_operator()
    return 2 * sum(count for operator, count in by_operator.items()
                   if any(key in operator for key in FVCORE_MATMUL_OPERATORS))


def check_model(name: str, report=None, with_fvcore: bool = True, seed: int = 0,
                share_weights: bool = False) -> dict:
    """Runs the coverage check of one timm model in this process.

    Args:
        name: a timm model name.
        report: called with keyword results as soon as each is known (so a parent that
            kills a slow child still has the stages that finished); None to only return them.
        with_fvcore: also count FLOPs with fvcore (the slowest stage for large models).
        seed: seeds the weights, the gate logits and the inputs.
        share_weights: convert with ``copy_model=False`` (the DAG shares the model's
            parameters), which large models need to fit the memory bound.

    Returns:
        The recorded fields: ``input_size``, ``params``, ``convert_max_rel_diff``,
        ``converts_exactly``, ``roundtrip_exact``, ``flops``, ``prunable``, ``prunable_groups``,
        ``prunable_proportion``, ``max_removable_proportion``, ``removal_max_rel_diff``,
        ``removal_exact``, ``slim_params``, ``slim_roundtrip_exact``, ``flops_fvcore``,
        ``flops_ratio``. A failing stage
        raises; the fields recorded before it have gone to ``report``.
    """
    record: dict = {}

    def note(**fields):
        record.update(fields)
        if report is not None:
            report(**fields)

    note(stage="build")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, input_size = build_at_working_size(name, note)
    note(params=sum(p.numel() for p in model.parameters()))

    note(stage="convert")
    dag = convert_as_the_cli_does(model, input_size, share_weights, note)
    torch.manual_seed(seed)
    difference = dp.compare_module_outputs(model, dag, (2, *input_size), raise_error=False)
    note(convert_max_rel_diff=float(difference),
         converts_exactly=bool(difference <= CONVERSION_TOLERANCE))

    note(stage="flops")
    note(flops=int(dp.count_flops(dag, input_size).total))

    note(stage="prune")
    pruning, gated, target = prepare_at_target_or_reachable(dag, input_size, PRUNING_TARGET, 100)
    note(prunable=True, pruning_target=target, prunable_groups=len(pruning.prunable_groups),
         channel_groups=len(pruning.channel_groups),
         prunable_proportion=float(pruning.prunable_proportion),
         max_removable_proportion=float(pruning.max_removable_proportion))

    note(stage="remove")
    removal_difference, slim, x = removal_difference_at_random_gates(pruning, gated, input_size, 2, seed + 1)
    exact = removal_difference <= REMOVAL_TOLERANCE
    note(removal_max_rel_diff=removal_difference, slim_params=sum(p.numel() for p in slim.parameters()))
    if not exact:  # rounding amplified by the random weights, or a wrong removal: float64 tells
        difference64 = float64_removal_difference(gated, slim, x)
        exact = difference64 <= FLOAT64_REMOVAL_TOLERANCE
        note(removal_max_rel_diff_float64=difference64)
    note(removal_exact=bool(exact))
    note(stage="slim roundtrip")
    note(slim_roundtrip_exact=round_trips_exactly(slim, x))
    del gated, slim, pruning

    if with_fvcore:
        note(stage="fvcore")
        try:
            reference = fvcore_flops(model, input_size)
            note(flops_fvcore=reference, flops_ratio=record["flops"] / reference if reference else None)
        except Exception as error:  # noqa: BLE001 - fvcore's own limits are recorded, not failures
            note(fvcore_error=first_line(error))

    note(stage="roundtrip")  # last: with the original model freed, a large DAG and its loaded
    del model                # copy fit the address-space bound together
    note(roundtrip_exact=round_trips_exactly(dag, torch.randn(2, *input_size)))
    note(stage="done")
    return record


def convert_as_the_cli_does(model: nn.Module, input_size, share_weights: bool, note) -> dp.DagModule:
    """``build_from_unstructured_module``, with an example batch of two ``input_size`` inputs when
    the model holds blocks that tracing follows only with example inputs, or when its symbolic
    trace fails (as ``dagprune convert`` / ``prune`` convert them; recorded as
    ``converted_with_example_inputs``)."""
    import dagprune.tracing

    needs = getattr(dagprune.tracing, "needs_example_inputs", lambda model: False)(model)
    example = (torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0)),)
    note(converted_with_example_inputs=bool(needs))
    if needs:
        return dp.build_from_unstructured_module(model, copy_model=not share_weights, example_inputs=example)
    try:
        return dp.build_from_unstructured_module(model, copy_model=not share_weights)
    except dp.errors.ConversionError as symbolic_error:
        try:
            dag = dp.build_from_unstructured_module(model, copy_model=not share_weights, example_inputs=example)
        except dp.errors.ConversionError:
            raise symbolic_error from None
        note(converted_with_example_inputs=True)
        return dag


def round_trips_exactly(dag: dp.DagModule, x: torch.Tensor) -> bool:
    """Saves ``dag``, loads it back and compares outputs (eval mode) and tensors bit for bit."""
    with tempfile.TemporaryDirectory(prefix="dagprune-coverage-") as folder:
        loaded = dp.load_dag(dag.save(Path(folder) / "dag")).eval()
    was_training = dag.training
    dag.eval()
    try:
        with torch.no_grad():
            expected, actual = dag(x), loaded(x)
    finally:
        dag.train(was_training)
    same_state = dag.state_dict().keys() == loaded.state_dict().keys() and all(
        torch.equal(value, loaded.state_dict()[key]) for key, value in dag.state_dict().items())
    return same_state and _bit_equal(expected, actual)


def _bit_equal(first, second) -> bool:
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and first.dtype == second.dtype and torch.equal(first, second)
    if isinstance(first, (tuple, list)):
        return type(first) is type(second) and len(first) == len(second) and all(
            _bit_equal(a, b) for a, b in zip(first, second))
    if isinstance(first, dict):
        return first.keys() == second.keys() and all(_bit_equal(first[k], second[k]) for k in first)
    return first == second


# ------------------------------------------------------------------------------- the child
def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, MemoryError) or "can't allocate memory" in text \
        or "Cannot allocate memory" in text or "DefaultCPUAllocator" in text or "std::bad_alloc" in text


def _child_main(name: str, connection, memory_bytes: int, cpu_seconds: int, with_fvcore: bool,
                share_weights: bool) -> None:
    """Runs in the forked child: bounds itself, checks ``name``, streams fields to the parent."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 10))
    signal.signal(signal.SIGXCPU, _raise_cpu_time_exceeded)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # timm/fvcore deprecation chatter would bury the progress bar
    stage = {"stage": "start"}

    def report(**fields):
        stage.update(fields)
        connection.send(fields)

    try:
        check_model(name, report, with_fvcore, share_weights=share_weights)
        connection.send({"status": "ok"})
    except CpuTimeExceeded:
        connection.send({"status": "timeout", "error": f"CPU time over {cpu_seconds} s "
                                                       f"(in stage {stage['stage']})"})
    except BaseException as error:  # noqa: BLE001 - everything is recorded, nothing escapes
        status = "oom" if _is_out_of_memory(error) else "error"
        connection.send({"status": status, "error": first_line(error), "error_stage": stage["stage"],
                         "traceback": traceback.format_exc(limit=-6)[-3000:]})
    finally:
        connection.close()
        os._exit(0)


class CpuTimeExceeded(Exception):
    """Raised in the child when its CPU-time soft limit is reached (SIGXCPU)."""


def _raise_cpu_time_exceeded(signum, frame):
    raise CpuTimeExceeded()


def _address_space_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def code_version() -> dict:
    """Which dagprune code the sweep runs: HEAD, and a hash of the imported source files.

    Other work may leave uncommitted edits in the tree; the hash tells which records were
    produced by the same code.
    """
    import subprocess

    files = sorted(Path(module.__file__) for module in list(sys.modules.values())
                   if getattr(module, "__file__", None) and module.__name__.split(".")[0]
                   in ("dagprune", "dagprune_algorithms"))
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.relative_to(SOURCE_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    if SOURCE_ROOT != REPO_ROOT:
        snapshot = SOURCE_ROOT / "COMMIT"
        head = snapshot.read_text().strip() if snapshot.exists() else None
        return {"git_head": head, "source_dirty": False, "source": str(SOURCE_ROOT),
                "source_sha1": digest.hexdigest()[:12]}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "dagprune", "dagprune_algorithms"],
                                    cwd=REPO_ROOT, text=True, capture_output=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        head, dirty = None, None
    return {"git_head": head, "source_dirty": dirty, "source_sha1": digest.hexdigest()[:12]}


@dataclasses.dataclass(frozen=True)
class Lane:
    """The bounds a model runs under. Models over ``large_params`` parameters take the large
    lane: a bigger address space, more time, the DAG sharing the model's weights, and an
    exclusive lock (:func:`machine_share`) so that no other shard's model runs beside them."""

    name: str
    memory_gb: float
    cpu_seconds: int
    wall_seconds: int
    share_weights: bool = False
    exclusive: bool = False


def choose_lane(params: int | None, options) -> Lane | None:
    """The lane for a model of ``params`` parameters (None: counted later), or None when it is
    over ``options.max_params`` and skipped."""
    if params is not None and params > options.max_params:
        return None
    if params is not None and params > options.large_params:
        return Lane("large", options.large_memory_gb, options.cpu_seconds * LARGE_TIME_FACTOR,
                    options.wall_seconds * LARGE_TIME_FACTOR, share_weights=True, exclusive=True)
    return Lane("small", options.memory_gb, options.cpu_seconds, options.wall_seconds)


@contextlib.contextmanager
def machine_share(lock_path: Path, exclusive: bool):
    """Holds ``lock_path`` shared (small models: the shards run side by side) or exclusively
    (a large model waits until no other shard is inside, and keeps them out meanwhile)."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_one(name: str, context, options, with_fvcore: bool, version: dict | None = None) -> dict:
    """Checks ``name`` in a forked child under its lane's bounds; always returns a record."""
    record = {"name": name, "timm_version": timm.__version__, "torch_version": torch.__version__,
              **(version or {}),
              "converts_exactly": False, "prunable": False, "removal_exact": False}
    start = time.monotonic()
    meta_params = count_parameters_on_meta(name)
    lane = choose_lane(meta_params, options)
    if lane is None:
        record.update(status="skipped", params=meta_params, time_s=round(time.monotonic() - start, 2),
                      error=f"skipped: {meta_params / 1e6:.0f}M parameters, over the "
                            f"{options.max_params / 1e6:.0f}M that fit the {options.large_memory_gb:g} GB "
                            "bound of the large lane")
        return record
    record.update(lane=lane.name, memory_gb=lane.memory_gb)
    with machine_share(options.results.with_suffix(".lock"), lane.exclusive):
        record.update(_run_in_child(name, context, lane, with_fvcore))
    if record["status"] != "ok" and "error_stage" not in record:
        record["error_stage"] = record.get("stage")
    return record


PAUSE_SECONDS = 30.0
"""A gap this long between two polls of a child (each waits at most a second) means the sweep
was paused (``kill -STOP``, a suspended laptop): the gap does not count against the wall clock."""


def _deadline_after_pause(deadline: float, polled: float) -> tuple[float, float]:
    """``deadline`` moved later by a pause since the previous poll at ``polled``, and now.

    >>> _deadline_after_pause(100.0, time.monotonic() - 120.0)[0] > 200.0
    True
    >>> _deadline_after_pause(100.0, time.monotonic())[0]
    100.0
    """
    now = time.monotonic()
    gap = now - polled
    return (deadline + gap if gap > PAUSE_SECONDS else deadline), now


def _run_in_child(name: str, context, lane: Lane, with_fvcore: bool) -> dict:
    """Forks the child, relays its fields until it reports a status or dies, kills it at the
    wall-clock bound; the fields and a status, always."""
    record: dict = {}
    start = time.monotonic()
    cpu_seconds, wall_seconds = lane.cpu_seconds, lane.wall_seconds
    memory_bytes = _address_space_bytes() + int(lane.memory_gb * 2 ** 30)
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(name, sender, memory_bytes, cpu_seconds, with_fvcore,
                                                      lane.share_weights))
    child.start()
    sender.close()
    deadline = start + wall_seconds
    polled = start
    try:
        while True:
            deadline, polled = _deadline_after_pause(deadline, polled)
            remaining = deadline - polled
            if remaining <= 0:
                record.update(status="timeout", error=f"wall-clock time over {wall_seconds} s "
                                                      f"(in stage {record.get('stage')})")
                break
            if receiver.poll(min(remaining, 1.0)):
                try:
                    record.update(receiver.recv())
                except EOFError:
                    break
                if "status" in record:
                    break
            elif not child.is_alive() and not receiver.poll(0):
                break
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    record["time_s"] = round(time.monotonic() - start, 2)
    cpu_seconds_used = usage.ru_utime + usage.ru_stime - usage_before.ru_utime - usage_before.ru_stime
    record["cpu_s"] = round(cpu_seconds_used, 2)
    if "status" not in record:
        code = child.exitcode
        killed_by = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if record["cpu_s"] >= cpu_seconds:  # the hard RLIMIT_CPU kill of a child stuck in C++
            record.update(status="timeout",
                          error=f"CPU time over {cpu_seconds} s (in stage {record.get('stage')})")
        else:  # RLIMIT_AS failures inside C++ and the kernel's OOM killer end here
            status = "oom" if code == -signal.SIGKILL else "crashed"
            record.update(status=status, error=f"child died ({killed_by}) in stage {record.get('stage')}")
    return record


# --------------------------------------------------------------------------------- the sweep
def select_names(pattern: str | None, shard: tuple[int, int], limit: int | None) -> list[str]:
    """timm's names filtered by ``pattern``, in a fixed hash order (so a partial run is a fair
    sample of the zoo rather than its first letters), then this shard's share."""
    names = timm.list_models()
    if pattern:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in pattern.split(","))]
    names.sort(key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    index, count = shard
    names = names[index::count]
    return names[:limit] if limit else names


def failed_names(path: Path) -> set[str]:
    """Names whose last record is not convertible with exact channel removal and bit-exact
    save/load of the DAG and the slim model."""
    last = read_records(path, tolerant=True) if path.exists() else {}
    return {name for name, record in last.items()
            if not (record.get("converts_exactly") and record.get("prunable")
                    and record.get("removal_exact") and record.get("roundtrip_exact")
                    and record.get("slim_roundtrip_exact"))}


def parse_shard(text: str) -> tuple[int, int]:
    index, count = (int(part) for part in text.split("/"))
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return index, count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSONL file (appended)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help="i/n: this run's share")
    parser.add_argument("--models", default=None, help="fnmatch patterns, comma-separated")
    parser.add_argument("--limit", type=int, default=None, help="at most this many models")
    parser.add_argument("--cpu-seconds", type=int, default=120, help="CPU-time bound per model")
    parser.add_argument("--wall-seconds", type=int, default=900, help="wall-clock bound per model")
    parser.add_argument("--memory-gb", type=float, default=6.0, help="address space per model")
    parser.add_argument("--large-params", type=float, default=250e6,
                        help="larger models run one at a time across shards, under --large-memory-gb "
                             f"and {LARGE_TIME_FACTOR}x the time bounds")
    parser.add_argument("--large-memory-gb", type=float, default=18.0, help="address space of a large model")
    parser.add_argument("--max-params", type=float, default=1.4e9, help="skip larger models")
    parser.add_argument("--no-fvcore", action="store_true", help="skip the fvcore comparison")
    parser.add_argument("--redo", action="store_true", help="rerun names already in --results")
    parser.add_argument("--rerun-failures", action="store_true",
                        help="rerun the names whose record is not convertible-and-prunable")
    parser.add_argument("--source", type=Path, default=REPO_ROOT,
                        help="import dagprune from this folder (a `git archive` snapshot, with a "
                             "COMMIT file naming its commit)")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    args.results.parent.mkdir(parents=True, exist_ok=True)
    names = select_names(args.models, args.shard, args.limit)
    if args.rerun_failures:
        failed = failed_names(args.results)
        names = [n for n in names if n in failed]
    elif not args.redo:
        finished = done_names(args.results, tolerant=True)
        names = [n for n in names if n not in finished]
    context = multiprocessing.get_context("fork")
    version = code_version()
    # `kill PID` ends the sweep through run_one's cleanup, which kills the running child too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    counts = {"ok": 0, "exact": 0, "prunable": 0}
    progress = tqdm(names, desc=f"shard {args.shard[0]}/{args.shard[1]}", unit="model",
                    mininterval=5, file=sys.stderr)
    for name in progress:
        progress.set_postfix_str(name[:30])
        record = run_one(name, context, args, not args.no_fvcore, version)
        append_record(args.results, record, sort_keys=True)  # one write per line: shards share the file
        counts["ok"] += record["status"] == "ok"
        counts["exact"] += bool(record.get("converts_exactly"))
        counts["prunable"] += bool(record.get("prunable") and record.get("removal_exact"))
        progress.set_postfix(counts, refresh=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
