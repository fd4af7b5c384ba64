"""``dagprune prune``: train (or load) a baseline, prune it to a FLOPs target, fine-tune, report.

The defaults run offline in a few minutes on 2 CPU cores: timm's ``test_resnet`` on
scikit-learn's digits (real 8x8 scans of handwritten digits, shipped inside scikit-learn),
upsampled to 32x32. Every option is checked, and the model converted and set up for pruning
once, before any training. Every phase checkpoints into the output directory, so an interrupted
run resumes where it stopped when started again with the same arguments, and finishes with the
results an uninterrupted run gives; :mod:`.run_directory` refuses a rerun there with arguments
that change the results.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import dagprune
from dagprune.errors import PruningError
from dagprune.training_mode import evaluation_mode

from dagprune_algorithms.app.distillation import (distillation_logs, distillation_loss, make_distiller,
                                                  supervised_step)
from dagprune_algorithms.app.distributed import (SINGLE_PROCESS, Ranks, gathered_state, is_sharded, process_group,
                                                  shard_gated_model)
from dagprune_algorithms.app.latency_calibration import alternated_latency_share, match_measured_latency
from dagprune_algorithms.app.models import as_dag
from dagprune_algorithms.app.prune_arguments import (PruneUsageError, add_prune_arguments,
                                                     check_images_fit_in_memory, validate_prune_arguments)
from dagprune_algorithms.app.run_directory import check_run_matches, record_run, run_identity
from dagprune_algorithms.app.training import (StepResult, evaluate_accuracy, load_checkpoint, materialize,
                                              save_checkpoint, train_steps)
from dagprune_algorithms.pruning.channel_pruning import TARGET_TOLERANCE, check_flops_target

__all__ = ["add_prune_arguments", "run_prune", "PruneUsageError"]

LOG = logging.getLogger("dagprune.prune")

CONVERSION_TOLERANCE = 1e-5
"""Largest difference between the model and its DAG, relative to the output scale."""

LATENCY_BATCH = 32
"""Batch size at which the report times the models (and ``--budget latency`` its table)."""

_COST_NOUNS = {"flops": "FLOPs", "params": "parameters", "latency": "latency"}


class _FailedCheck(Exception):
    """A check of the run failed: the job stops and the command exits with 1."""


def _progress(job: _PruneJob, description: str):
    """A tqdm progress bar on rank 0 (None with ``--no-progress`` and on the other ranks)."""
    if job.args.no_progress or not job.ranks.is_main:
        return None
    from tqdm import tqdm

    return lambda iterable, total, initial: tqdm(iterable, total=total, initial=initial,
                                                 desc=description, leave=False, file=sys.stderr)


def _measure(model, name, data_val, input_shape, original_flops, device, accuracy=None):
    from dagprune_algorithms.app.latency import measure_latency
    from dagprune_algorithms.pruning import compute_flops

    flops = compute_flops(model, input_shape)
    latency = measure_latency(model, input_shape, batch_size=LATENCY_BATCH, device=device)
    spatial = math.prod(input_shape[1:])
    return {"model": name,
            "accuracy": (accuracy if accuracy is not None
                         else evaluate_accuracy(model, *data_val, device=device)) / 100.0,
            "kmapp": flops / (spatial * 1000), "flops": flops,
            "flops_proportion": flops / original_flops,
            "params": sum(p.numel() for p in model.parameters()),
            "latency_ms": latency.median_ms, "latency_iqr_ms": latency.iqr_ms, "latency_device": latency.device}


@dataclass
class _PruneJob:
    """What every phase of a run needs: the arguments, the data tensors, the device, the output
    directory and the processes training together (rank 0 alone writes into ``out``)."""

    args: argparse.Namespace
    train: tuple
    val: tuple
    device: torch.device
    out: Path
    distiller: Any = None  # a .distillation.Distiller with --distill
    ranks: Ranks = SINGLE_PROCESS
    latency_table: Any = None  # a LatencyTable with --budget latency
    width_table: Any = None  # the WidthTable of --round-to auto


@dataclass
class _Pruned:
    """What pruning gives: the slim model, the training history, the accuracy of the gated (or
    masked) model, the largest relative difference between it and the slim model, and the FLOPs
    share the gates keep (None where the method does not predict one)."""

    model: dagprune.DagModule
    history: list
    gated_accuracy: float
    removal_difference: float
    gated_proportion: float | None = None
    latency_calibration: list | None = None  # the rounds of --budget latency's measured calibration


def _load_data(args, ranks: Ranks):
    """The data split and its ``(inputs, labels)`` train and validation tensors; logs what they are.

    Raises:
        PruneUsageError: a step of ``--batch-size`` x ``--grad-accum`` x processes needs more
            images than the training set has.
    """
    from dagprune_algorithms.app.data import load_dataset

    split = load_dataset(args.data_dir, image_size=args.image_size, seed=args.seed,
                         limit_train=args.limit_train, limit_val=args.limit_val)
    train, val = materialize(split.train), materialize(split.val)
    LOG.info("data: %s, %d train / %d val images of %s, %d classes", split.name, len(train[0]),
             len(val[0]), "x".join(map(str, split.input_shape)), split.num_classes)
    step_images = args.batch_size * args.grad_accum * ranks.world_size
    if step_images > args.batch_size and step_images > len(train[0]):
        raise PruneUsageError(f"a step takes --batch-size {args.batch_size} x --grad-accum {args.grad_accum} x "
                              f"{ranks.world_size} process(es) = {step_images} images, more than the "
                              f"{len(train[0])} training images; lower --batch-size or --grad-accum")
    if args.batch_size > len(train[0]):
        LOG.warning("--batch-size %d is larger than the %d training images: every step uses all of them",
                    args.batch_size, len(train[0]))
    return split, train, val


def _check_pruning_setup(args, model, input_shape, device, latency_table=None, width_table=None) -> None:
    """Runs what the job will do to ``model`` once, on a copy, before any training: a forward pass
    at the input size, the conversion, and the pruning setup (groups, target, units, schedule).

    Raises:
        PruneUsageError: the model cannot run on images of ``--image-size``.
        DagpruneError: the conversion or the pruning setup fails (unreachable target, unknown
            unit names, no prunable group, ...).
    """
    with torch.random.fork_rng(devices=[]):
        try:
            with evaluation_mode(model), torch.no_grad():
                model(torch.zeros(1, *input_shape, device=device))
        except (RuntimeError, ValueError, AssertionError, IndexError) as error:
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise PruneUsageError(f"{args.model} cannot run on {'x'.join(map(str, input_shape))} images "
                                  f"({type(error).__name__}: {first_line}); choose another --image-size") from error
        dag = as_dag(model, input_shape)
        _check_conversion(args, model, dag, input_shape, device)
        if args.method == "l1":
            from dagprune_algorithms.app.iterative_job import plan_from_arguments

            plan_from_arguments(dag, input_shape, args)
        else:
            pruning = _channel_pruning(args, dag, input_shape, latency_table, width_table=width_table)
            pruning.prepare_for_pruning()
            largest = max(group.size for group in pruning.prunable_groups)
            if largest <= args.block_size:
                raise PruneUsageError(f"--block-size {args.block_size}: kept channel counts are multiples of it, "
                                      f"and the largest prunable group of {args.model} has {largest} channels, so "
                                      f"nothing can be removed; choose a --block-size below {largest}")


def _channel_pruning(args, dag, input_shape, latency_table=None, ranks: Ranks = SINGLE_PROCESS,
                     width_table=None):
    """The :class:`ChannelPruning` of ``--method dag`` for ``dag`` (with ``--round-to auto``'s
    table); a NaN that one of ``ranks`` finds in its checks stops them all."""
    from dagprune_algorithms.pruning import ChannelPruning

    return ChannelPruning(dag, input_shape, args.target, args.steps, block_size=args.block_size,
                          head_pruning=args.head_pruning, exclude=args.exclude, budget=args.budget,
                          latency_table=latency_table, min_channels=args.min_channels,
                          round_to=args.round_to if width_table is None else "auto", width_table=width_table,
                          distributed_checks=ranks.distributed)


def _latency_table(args, model, input_shape, device, ranks: Ranks):
    """``--budget latency``: the model's latency table on ``device`` at the report's batch, from
    ``--latency-cache`` or measured into it (rank 0 measures, then the others read its file)."""
    if args.budget != "latency":
        return None
    from dagprune_algorithms.pruning.latency_table import measure_latency_table

    dag = as_dag(model, input_shape)
    table = _measured_by_rank_zero(ranks, lambda: measure_latency_table(
        dag, input_shape, batch_size=LATENCY_BATCH, device=device, cache_dir=args.latency_cache,
        progress=not args.no_progress))
    LOG.info("latency table: %s (%s; %.1f ms at full width, fit error %.1f%%)", table.path,
             "from the cache" if table.from_cache else "measured", 1000 * table.model_seconds[-1],
             100 * table.fit_error())
    return table


def _measured_by_rank_zero(ranks: Ranks, measure):
    """``measure()`` of a cached table: rank 0 measures it into the cache first, then the other
    ranks read the file (so every rank uses the same measurement)."""
    table = None
    for measuring in (ranks.is_main, not ranks.is_main):
        if measuring:
            table = measure()
        ranks.barrier()
    return table


def _resolve_round_to(args, device, ranks: Ranks):
    """``--round-to auto``: sets ``args.round_to`` to the channel multiple ``device`` runs fast and
    returns the width table it was read from (rank 0 measures it into the cache, then the others
    read its file); 1, and no table, with ``--block-size`` or ``--method l1``."""
    if args.round_to != "auto":
        return None
    if args.block_size > 1 or args.method != "dag":
        args.round_to = 1
        return None
    from dagprune_algorithms.pruning.width_table import measure_width_table

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp, torch.float32)
    table = _measured_by_rank_zero(ranks, lambda: measure_width_table(device, dtype))
    args.round_to = table.best_multiple()
    LOG.info("--round-to auto: %s (%s)", table.summary(), "from the cache" if table.from_cache else "measured")
    return table


def _check_conversion(args, model, dag, input_shape, device) -> None:
    """Raises :class:`_FailedCheck` when ``dag`` does not compute what ``model`` computes (on ``device``)."""
    difference = dagprune.compare_module_outputs(model, dag, (2, *input_shape), atol=CONVERSION_TOLERANCE,
                                                 raise_error=False, device=device)
    if not difference <= CONVERSION_TOLERANCE:
        raise _FailedCheck(f"the DAG of {args.model} differs from the model by {difference:.3g} (relative to the "
                           f"output scale; tolerance {CONVERSION_TOLERANCE:g}), so pruning it would not prune "
                           f"the model; `dagprune convert {args.model} --input-size "
                           f"{' '.join(map(str, input_shape))}` shows the DAG")


def _train_with_adam(job: _PruneJob, model, lr: float, seed: int, steps: int, checkpoint: str,
                     phase: str, distiller=None) -> None:
    """Trains ``model`` on cross-entropy (plus ``distiller``'s loss) for ``steps`` steps, resuming
    from ``out/checkpoint``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    trained = job.ranks.wrap(model, _example_inputs(job))
    train_steps(model, optimizer, job.train, job.args.batch_size, seed, steps,
                step_fn=None if distiller is None else supervised_step(trained, distiller),
                checkpoint_path=job.out / checkpoint,
                checkpoint_every=job.args.checkpoint_every, device=job.device, progress=_progress(job, phase),
                **_parallel_options(job, trained))


def _example_inputs(job: _PruneJob) -> torch.Tensor:
    """Two training images, on which :meth:`Ranks.wrap` finds the parameters that get no gradient."""
    return job.train[0][:2].to(job.device)


def _parallel_options(job: _PruneJob, trained) -> dict:
    """The options of :func:`train_steps` that every phase shares: mixed precision, gradient
    accumulation, and the processes with the DistributedDataParallel ``trained`` they call."""
    return {"amp": job.args.amp, "grad_accum": job.args.grad_accum, "ranks": job.ranks, "ddp_model": trained}


def _prepare_baseline(job: _PruneJob, model, num_classes: int) -> float:
    """Loads ``--baseline-checkpoint`` into ``model`` or trains it (saving ``baseline.pt``);
    returns its validation accuracy in percent."""
    args = job.args
    if args.checkpoint:
        LOG.info("baseline: --checkpoint %s (no baseline trained)", args.checkpoint)
    elif args.baseline_checkpoint:
        state = load_checkpoint(args.baseline_checkpoint)
        try:
            model.load_state_dict(state.get("model", state))
        except (RuntimeError, AttributeError, TypeError) as error:
            raise PruneUsageError(f"--baseline-checkpoint {args.baseline_checkpoint} does not fit "
                                  f"{args.model} with {num_classes} classes: "
                                  f"{(str(error).strip().splitlines() or [''])[0]}") from error
        LOG.info("baseline: loaded %s", args.baseline_checkpoint)
    elif args.baseline_steps:
        _train_with_adam(job, model, args.lr, args.seed, args.baseline_steps, "baseline_training.ckpt", "baseline")
        if job.ranks.is_main:
            save_checkpoint(job.out / "baseline.pt", {"model": model.state_dict()})
        job.ranks.barrier()
    baseline_accuracy = evaluate_accuracy(model, *job.val, device=job.device, ranks=job.ranks)
    LOG.info("baseline: accuracy %.2f%%", baseline_accuracy)
    return baseline_accuracy


def _prune_with_gates(job: _PruneJob, dag, input_shape) -> _Pruned:
    """``--method dag``: trains the channel gates for ``--steps`` steps (with ``--fsdp`` on a
    sharded copy of the gated model), then removes the closed channels from the whole model."""
    device = job.device
    pruning = _channel_pruning(job.args, dag, input_shape, job.latency_table, job.ranks, job.width_table)
    gated = pruning.prepare_for_pruning().to(device)
    LOG.info("channel groups: %d (%d prunable); prunable_proportion %.4f, "
             "max_removable_proportion %.4f", len(pruning.channel_groups),
             len(pruning.prunable_groups), pruning.prunable_proportion,
             pruning.max_removable_proportion)
    history = _train_sharded_gates(job, pruning) if job.args.fsdp else _train_gates(job, pruning)
    gated.eval()
    calibration = None if job.args.budget != "latency" else match_measured_latency(
        pruning, dag, input_shape, job.device, job.ranks, LATENCY_BATCH)
    pruned = pruning.remove_channels().to(device)
    removal_difference = dagprune.compare_module_outputs(gated, pruned, (4, *input_shape),
                                                         raise_error=False, device=device)
    gated_accuracy = evaluate_accuracy(gated, *job.val, device=device, ranks=job.ranks)
    return _Pruned(pruned, history, gated_accuracy, removal_difference, pruning.current_hard_proportion(),
                   calibration)


def _train_gates(job: _PruneJob, pruning) -> list:
    """Trains the gated model of ``pruning`` and its gates (DistributedDataParallel unless it is
    sharded) for ``--steps`` steps, checkpointing ``pruning.ckpt``; returns the history."""
    args = job.args
    gated = pruning.pruning_model
    optimizer = torch.optim.Adam([{"params": pruning.weight_parameters(), "lr": args.lr},
                                  {"params": pruning.gate_parameters(), "lr": args.gate_lr}])
    trained = gated if is_sharded(gated) else job.ranks.wrap(gated, _example_inputs(job))

    def pruning_step(step, x, y):
        logits = trained(x)
        task_loss = F.cross_entropy(logits, y)
        distill_loss = distillation_loss(job.distiller, logits, x)
        proportion, flops_loss, entropy_loss, bkd_loss = \
            pruning.compute_current_proportion_and_pruning_losses(global_step=step)
        return StepResult(task_loss + flops_loss + entropy_loss + bkd_loss + distill_loss, lambda: {
            "proportion": proportion.item(), "hard_proportion": pruning.current_hard_proportion(),
            "task_loss": task_loss.item(), "flops_loss": flops_loss.item(),
            "entropy_loss": entropy_loss.item(), "bkd_loss": bkd_loss.item(),
            **distillation_logs(job.distiller, distill_loss)})

    def validate(step, logs):
        if step % 100 and step != args.steps - 1:
            return {}
        return {"val_accuracy": evaluate_accuracy(gated, *job.val, device=job.device, ranks=job.ranks) / 100.0}

    history: list = []
    train_steps(gated, optimizer, job.train, args.batch_size, args.seed + 1, args.steps,
                step_fn=pruning_step, checkpoint_path=job.out / "pruning.ckpt",
                checkpoint_every=args.checkpoint_every, device=job.device,
                progress=_progress(job, "pruning"), history=history, on_log=validate,
                **_parallel_options(job, trained))
    return history


def _train_sharded_gates(job: _PruneJob, pruning) -> list:
    """``--fsdp``: trains a copy of ``pruning`` whose gated model is sharded over the processes
    (:func:`.distributed.shard_gated_model`) while ``pruning``'s own model waits on the CPU,
    then loads the trained state, gathered whole on every process, into ``pruning``'s gated
    model (which shares the DAG's weights, as an unsharded run trains them), where the channels
    are removed. Returns the history."""
    sharded = copy.deepcopy(pruning)
    shard_gated_model(sharded.pruning_model, sharded.gate_parameters(), job.ranks)
    gated = pruning.pruning_model.to("cpu")
    history = _train_gates(job, sharded)
    gated.load_state_dict(gathered_state(sharded.pruning_model.state_dict()))
    gated.to(job.device)
    return history


def _prune(job: _PruneJob, dag, input_shape) -> _Pruned:
    """Prunes ``dag`` by ``--method``."""
    if job.args.method == "dag":
        return _prune_with_gates(job, dag, input_shape)
    from dagprune_algorithms.app.iterative_job import run_iterative_l1

    return _Pruned(*run_iterative_l1(dag, input_shape, job.args, job.train, job.val, job.device, job.out,
                                     _progress(job, "l1 pruning"), job.distiller, job.ranks))


def _missed_target(args, reached_proportion: float) -> str | None:
    """The one-line message of a FLOPs (or ``--budget``) share above ``--target`` by more than
    :data:`TARGET_TOLERANCE` (None when met, or when the run has no FLOPs target)."""
    if args.target is None:
        return None
    try:
        check_flops_target(reached_proportion, args.target, TARGET_TOLERANCE)
    except PruningError:
        remedies = ["more --steps", "a higher --gate-lr"] if args.method == "dag" else ["more --prune-times"]
        if args.block_size > 1:
            remedies.append(f"a smaller --block-size (now {args.block_size})")
        noun = _COST_NOUNS[args.budget]
        return (f"{noun} target missed: the pruned model keeps {reached_proportion:.4f} of the original {noun}, "
                f"{reached_proportion - args.target:.4f} above --target {args.target:g} (tolerance "
                f"{TARGET_TOLERANCE:g}); its model and report are saved in {args.out}. Prune again into "
                f"another --out with {' or '.join(remedies)}")
    return None


def _finetune(job: _PruneJob, pruned) -> float:
    """Fine-tunes the pruned model for ``--finetune-steps``; returns its validation accuracy in percent."""
    args = job.args
    if args.finetune_steps:  # a tenth of the learning rate, gentle: weights already adapted
        _train_with_adam(job, pruned, args.lr / 10, args.seed + 2, args.finetune_steps, "finetune.ckpt",
                         "fine-tuning", job.distiller)
    pruned.eval()
    return evaluate_accuracy(pruned, *job.val, device=job.device, ranks=job.ranks)


def _reference_accuracy(job: _PruneJob, model) -> float:
    """Trains a copy of the unpruned model for the same total steps as the pruned one; returns its
    validation accuracy in percent."""
    args = job.args
    reference = copy.deepcopy(model).to(job.device)
    _train_with_adam(job, reference, args.lr, args.seed + 3, args.steps + args.finetune_steps, "reference.ckpt",
                     "reference")
    return evaluate_accuracy(reference, *job.val, device=job.device, ranks=job.ranks)


def _comparison_rows(job: _PruneJob, dag, pruned, input_shape, accuracies: dict) -> list:
    """The rows of the before/after table, latency timed on ``--device``: baseline, reference if
    trained, pruned."""
    args, val = job.args, job.val
    original_flops = dagprune.count_flops(dag, input_shape).total
    rows = [_measure(dag, f"{args.model} (baseline)", val, input_shape, original_flops, job.device,
                     accuracies["baseline"])]
    if accuracies.get("reference") is not None:
        rows.append({**rows[0], "model": f"{args.model} (baseline, same total steps)",
                     "accuracy": accuracies["reference"] / 100.0})
    rows.append(_measure(pruned, f"{args.model} (pruned, fine-tuned)", val, input_shape,
                         original_flops, job.device, accuracies["pruned"]))
    return rows


def _write_report(report: dict, out: Path, started: float) -> None:
    """Writes ``report.json`` and the plot of the pruning history; prints where they are."""
    from dagprune_algorithms.app.report import plot_training_history, write_json_report

    history = report["history"]
    write_json_report(out / "report.json", report)
    if history:
        plot_training_history(history, out / "pruning.png", target=report["target"])
    print(f"saved: {out / 'pruned'} (pruned DAG, load with dagprune.load_dag), {out / 'report.json'}"
          + (f", {out / 'pruning.png'}" if history else "") + f"; {time.time() - started:.0f} s")


def _start(args, ranks: Ranks) -> tuple:
    """Everything before the first training step: checks the output directory, the data and the
    pruning setup, then records the run (rank 0, while the others wait); returns ``(job, split,
    model)``."""
    from dagprune_algorithms.app.models import create_timm_model

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not ranks.is_main:  # the ranks compute alike: rank 0 tells for all
        logging.getLogger().setLevel(logging.WARNING)
    identity = run_identity(args, ranks.world_size)
    out = Path(args.out)
    check_run_matches(out, identity)
    check_images_fit_in_memory(args)
    torch.manual_seed(args.seed)
    device = ranks.device
    split, train, val = _load_data(args, ranks)
    input_shape = tuple(split.input_shape)
    model = create_timm_model(args.model, input_shape, num_classes=split.num_classes).to(device)
    if args.checkpoint:
        model = dagprune.load_weights(model, args.checkpoint).to(device)
    latency_table = _latency_table(args, model, input_shape, device, ranks)
    width_table = _resolve_round_to(args, device, ranks)
    _check_pruning_setup(args, model, input_shape, device, latency_table, width_table)
    if ranks.is_main:
        record_run(out, identity)
    ranks.barrier()
    return _PruneJob(args, train, val, device, out, ranks=ranks, latency_table=latency_table,
                     width_table=width_table), split, model


def run_prune(args) -> int:
    """Runs the whole job; returns the exit code: 0, or 1 when a check fails: the conversion is
    not exact (found before training), or the pruned model misses ``--target`` by more than the
    tolerance (its model and report are saved all the same).

    Under ``torchrun`` (or with ``--distributed``) every process runs this: see
    :mod:`.distributed`; every rank returns the same code, and rank 0 prints.

    Raises:
        DagpruneError: an argument, the data or the model cannot be used (before any training),
            or training cannot go on.
    """
    validate_prune_arguments(args)
    with process_group(args.device, required=args.distributed or args.fsdp,
                       option="--fsdp" if args.fsdp else "--distributed") as ranks:
        try:
            _run_job(args, ranks)
        except _FailedCheck as failed:
            if ranks.is_main:
                print(f"dagprune prune: check failed: {failed}", file=sys.stderr)
            return 1
    return 0


def _run_job(args, ranks: Ranks) -> None:
    """The job's phases in order; raises :class:`_FailedCheck` when a check fails."""
    started = time.time()
    job, split, model = _start(args, ranks)
    input_shape = tuple(split.input_shape)
    baseline_accuracy = _prepare_baseline(job, model, split.num_classes)
    dag = as_dag(model, input_shape)
    _check_conversion(args, model, dag, input_shape, job.device)
    job.distiller = make_distiller(args, dag, job.device)
    original_flops = dagprune.count_flops(dag, input_shape).total
    pruned = _prune(job, dag, input_shape)
    final_proportion = dagprune.count_flops(pruned.model, input_shape).total / original_flops
    reached = final_proportion if pruned.gated_proportion is None else pruned.gated_proportion
    missed = _missed_target(args, reached)
    LOG.info("pruned: FLOPs proportion %.4f (%s), accuracy before fine-tuning %.2f%%, "
             "removed model vs gated model max relative difference %.1e", final_proportion,
             "from --target-pruning-ratio" if args.target is None else
             f"{args.budget} target {args.target:.2f}, reached {reached:.4f}",
             pruned.gated_accuracy, pruned.removal_difference)

    pruned_accuracy = _finetune(job, pruned.model)
    if ranks.is_main:
        pruned.model.to("cpu").save(job.out / "pruned")
    reference_accuracy = None if args.no_reference else _reference_accuracy(job, model)
    if ranks.is_main:
        _report(job, split, started, dag, pruned, missed, final_proportion, {
            "baseline": baseline_accuracy, "reference": reference_accuracy, "pruned": pruned_accuracy})
    ranks.barrier()
    if missed:
        raise _FailedCheck(missed)


def _budget_summary(job: _PruneJob, rows: list, reached: float, dag, pruned, input_shape) -> dict:
    """What ``--budget`` counted, the share the pruned model reached, and the measured latency
    share (with the latency table's own prediction for ``--budget latency``). For a latency
    budget the share is timed with the two models in alternation, as the calibration timed it
    (the table's rows time each model once, minutes apart, which other work on the machine can
    skew by tens of percent); otherwise it is the rows' ratio."""
    args, table = job.args, job.latency_table
    measured = rows[-1]["latency_ms"] / rows[0]["latency_ms"] if rows[0]["latency_ms"] else float("nan")
    if args.budget == "latency":
        measured = alternated_latency_share(dag, pruned, input_shape, job.device, LATENCY_BATCH)
    summary = {"name": args.budget, "target": args.target, "reached": reached, "measured_latency_share": measured,
               "latency_table": None if table is None else {"path": str(table.path), "fit_error": table.fit_error(),
                                                            "description": table.description}}
    predicted = " (predicted by the latency table)" if table is not None else ""
    summary["summary"] = (f"budget {args.budget}: target {args.target if args.target is not None else '-'}, "
                          f"reached {reached:.3f}{predicted}; measured latency {measured:.3f} of the baseline's "
                          f"(batch {LATENCY_BATCH}, {rows[0]['latency_device']}"
                          f"{', timed in alternation' if args.budget == 'latency' else ''})")
    return summary


def _round_to_summary(job: _PruneJob) -> dict:
    """The multiple kept channel counts were rounded to, and the width table that chose it."""
    table = job.width_table
    return {"value": job.args.round_to, "auto": table is not None,
            "width_table": None if table is None else {"path": str(table.path), "summary": table.summary(),
                                                       "description": table.description}}


def _report(job: _PruneJob, split, started: float, dag, pruned: _Pruned, missed: str | None,
            final_proportion: float, accuracies: dict) -> None:
    """Prints the before/after table and writes the report (rank 0's part of the job's end)."""
    from dagprune_algorithms.app.report import format_comparison_table

    args = job.args
    rows = _comparison_rows(job, dag, pruned.model, tuple(split.input_shape), accuracies)
    reached = final_proportion if pruned.gated_proportion is None else pruned.gated_proportion
    budget = _budget_summary(job, rows, reached, dag, pruned.model, tuple(split.input_shape))
    budget["measured_calibration"] = pruned.latency_calibration
    rows[0]["budget_share"], rows[-1]["budget_share"] = f"{args.budget} 1.000", f"{args.budget} {budget['reached']:.3f}"
    print(format_comparison_table(rows))
    print(budget["summary"])
    report = {"model": args.model, "data": split.name, "method": args.method, "target": args.target,
              "budget": budget, "round_to": _round_to_summary(job),
              "final_proportion": final_proportion, "target_reached": None if args.target is None else not missed,
              "target_tolerance": TARGET_TOLERANCE, "removal_max_relative_difference": pruned.removal_difference,
              "accuracy_before_finetune": pruned.gated_accuracy, "rows": rows, "history": pruned.history,
              "arguments": {k: v for k, v in vars(args).items() if k != "run"},
              "processes": job.ranks.world_size, "elapsed_s": time.time() - started}
    _write_report(report, job.out, started)
