"""``dagprune prune``: train (or load) a baseline, prune it to a FLOPs target, fine-tune, report.

The defaults run offline in a few minutes on 2 CPU cores: timm's ``test_resnet`` on
scikit-learn's digits (real 8x8 scans of handwritten digits, shipped inside scikit-learn),
upsampled to 32x32. Every phase checkpoints into the output directory, so an interrupted run
resumes where it stopped when started again with the same arguments.
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

import torch
import torch.nn.functional as F

import dagprune
from dagprune.errors import DagpruneError

from dagprune_algorithms.app.iterative_job import DEFAULT_PRUNE_TIMES
from dagprune_algorithms.app.training import (StepResult, evaluate_accuracy, load_checkpoint, materialize,
                                              save_checkpoint, train_steps)
from dagprune_algorithms.pruning.channel_groups import HEAD_PRUNING_MODES
from dagprune_algorithms.pruning.importance import IMPORTANCE_CRITERIA

__all__ = ["add_prune_arguments", "run_prune"]

LOG = logging.getLogger("dagprune.prune")


DEFAULT_FLOPS_TARGET = 0.5
"""``--target`` when neither it nor ``--target-pruning-ratio`` is given."""

_L1_ONLY_OPTIONS = (("--prune-times", "prune_times"), ("--step-epoch", "step_epoch"),
                    ("--target-pruning-ratio", "target_pruning_ratio"), ("--importance", "importance"))
"""``(flag, argument name)`` of the options that only ``--method l1`` uses."""


class PruneUsageError(DagpruneError):
    """An argument of ``dagprune prune`` cannot be honoured."""


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of ``dagprune prune``."""
    parser.add_argument("--model", default="test_resnet", help="timm model name (pretrained=False)")
    parser.add_argument("--data-dir", default=None,
                        help="image folder (one subfolder per class) or a folder of MNIST-style IDX "
                             "files; default: scikit-learn's built-in digits")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--target", type=float, default=None,
                        help=f"target FLOPs as a fraction of the original, in (0, 1) (default "
                             f"{DEFAULT_FLOPS_TARGET}); not with --target-pruning-ratio")
    parser.add_argument("--method", choices=["dag", "l1"], default="dag",
                        help="dag: differentiable gates with FLOPs/entropy/distillation losses; "
                             "l1: iterative pruning (mmrazor's ItePruneAlgorithm), channels ranked "
                             "by --importance")
    parser.add_argument("--steps", type=int, default=200, help="pruning steps")
    l1_options = parser.add_argument_group(
        "--method l1 only", "mmrazor's ItePruneAlgorithm settings; a step is one training iteration")
    l1_options.add_argument("--prune-times", type=int, default=None, metavar="N",
                            help="prunes to reach the target, the kept share falling linearly (default "
                                 f"{DEFAULT_PRUNE_TIMES}, fewer if --steps is too short for them)")
    l1_options.add_argument("--step-epoch", type=int, default=None, metavar="STEPS",
                            help="steps between two prunes, the first at step 0 (ItePruneAlgorithm's "
                                 "step_epoch; default --steps // --prune-times)")
    l1_options.add_argument("--target-pruning-ratio", default=None, metavar="RATIO|FILE",
                            help="what the last prune keeps instead of a FLOPs --target: one fraction "
                                 "of every unit's channels (e.g. 0.7), or a JSON file {unit name: "
                                 "fraction} as `dagprune units MODEL --choice -o FILE` writes (units "
                                 "left out are not pruned)")
    l1_options.add_argument("--importance", default=None, choices=sorted(IMPORTANCE_CRITERIA),
                            help="how channels are ranked: l1 (weight norm, the default), bn_scale "
                                 "(scale of the norm layer after them) or taylor (|weight x "
                                 "gradient| averaged over the steps between prunes; the prune due at "
                                 "step 0 waits for step 1)")
    parser.add_argument("--baseline-steps", type=int, default=200,
                        help="steps to train the baseline when no --baseline-checkpoint is given")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--baseline-checkpoint", default=None,
                        help="a state dict of the unpruned model (from a previous run's "
                             "baseline.pt) to start from instead of training one")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip training the unpruned reference for the same total steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate of the weights")
    parser.add_argument("--gate-lr", type=float, default=5e-2, help="Adam learning rate of the gates")
    parser.add_argument("--block-size", type=int, default=1)
    parser.add_argument("--head-pruning", choices=HEAD_PRUNING_MODES, default="dims",
                        help="attention: remove the same head dims from every head (dims) or whole "
                             "heads (heads)")
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--limit-val", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="out/prune", help="output directory")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _validate(args) -> None:
    """Checks the arguments before any work; fills in the default ``--target``."""
    for name in ("steps", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            raise PruneUsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("baseline_steps", "finetune_steps"):
        if getattr(args, name) < 0:
            raise PruneUsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    given_l1_options = [flag for flag, name in _L1_ONLY_OPTIONS if getattr(args, name) is not None]
    if args.method != "l1" and given_l1_options:
        raise PruneUsageError(f"{', '.join(given_l1_options)} appl{'y' if len(given_l1_options) > 1 else 'ies'} "
                              f"to --method l1 only (--method "
                              f"{args.method} prunes with gates over all --steps); add --method l1 or drop them")
    if args.target is not None and args.target_pruning_ratio is not None:
        raise PruneUsageError("--target (a FLOPs target) and --target-pruning-ratio (the kept share per unit) "
                              "both say how far to prune; give one (with --target-pruning-ratio the FLOPs "
                              "follow from the ratios and are reported)")
    if args.target is None and args.target_pruning_ratio is None:
        args.target = DEFAULT_FLOPS_TARGET
    if args.target is not None and not 0 < args.target < 1:
        raise PruneUsageError(f"--target must be in (0, 1) (a fraction of the original FLOPs), got {args.target}")
    if args.method == "l1":
        from dagprune_algorithms.app.iterative_job import iterative_schedule, parse_target_pruning_ratio

        try:
            iterative_schedule(args.steps, args.prune_times, args.step_epoch, args.importance or "l1")
            parse_target_pruning_ratio(args.target_pruning_ratio)
        except DagpruneError as error:
            raise PruneUsageError(str(error)) from error
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise PruneUsageError(f"--device {args.device} asked for, but CUDA is not available")


def _progress(args, description: str):
    if args.no_progress:
        return None
    from tqdm import tqdm

    return lambda iterable, total, initial: tqdm(iterable, total=total, initial=initial,
                                                 desc=description, leave=False, file=sys.stderr)


def _measure(model, name, data_val, input_shape, original_flops, device, accuracy=None):
    from dagprune_algorithms.app.latency import measure_latency
    from dagprune_algorithms.pruning import compute_flops

    flops = compute_flops(model, input_shape)
    latency = measure_latency(model, input_shape, batch_size=32, device="cpu")
    spatial = math.prod(input_shape[1:])
    return {"model": name,
            "accuracy": (accuracy if accuracy is not None
                         else evaluate_accuracy(model, *data_val, device=device)) / 100.0,
            "kmapp": flops / (spatial * 1000), "flops": flops,
            "flops_proportion": flops / original_flops,
            "params": sum(p.numel() for p in model.parameters()),
            "latency_ms": latency.median_ms, "latency_iqr_ms": latency.iqr_ms}


@dataclass
class _PruneJob:
    """What every phase of a run needs: the arguments, the data tensors, the device and the output
    directory."""

    args: argparse.Namespace
    train: tuple
    val: tuple
    device: torch.device
    out: Path


def _load_data(args):
    """The data split and its ``(inputs, labels)`` train and validation tensors; logs what they are."""
    from dagprune_algorithms.app.data import load_dataset

    split = load_dataset(args.data_dir, image_size=args.image_size, seed=args.seed,
                         limit_train=args.limit_train, limit_val=args.limit_val)
    train, val = materialize(split.train), materialize(split.val)
    LOG.info("data: %s, %d train / %d val images of %s, %d classes", split.name, len(train[0]),
             len(val[0]), "x".join(map(str, split.input_shape)), split.num_classes)
    return split, train, val


def _train_with_adam(job: _PruneJob, model, lr: float, seed: int, steps: int, checkpoint: str,
                     phase: str) -> None:
    """Trains ``model`` on cross-entropy for ``steps`` steps, resuming from ``out/checkpoint``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_steps(model, optimizer, job.train, job.args.batch_size, seed, steps, checkpoint_path=job.out / checkpoint,
                checkpoint_every=job.args.checkpoint_every, device=job.device, progress=_progress(job.args, phase))


def _prepare_baseline(job: _PruneJob, model, num_classes: int) -> float:
    """Loads ``--baseline-checkpoint`` into ``model`` or trains it (saving ``baseline.pt``);
    returns its validation accuracy in percent."""
    args = job.args
    if args.baseline_checkpoint:
        state = load_checkpoint(args.baseline_checkpoint)
        try:
            model.load_state_dict(state.get("model", state))
        except RuntimeError as error:
            raise PruneUsageError(f"--baseline-checkpoint {args.baseline_checkpoint} does not fit "
                                  f"{args.model} with {num_classes} classes: {error}") from error
        LOG.info("baseline: loaded %s", args.baseline_checkpoint)
    elif args.baseline_steps:
        _train_with_adam(job, model, args.lr, args.seed, args.baseline_steps, "baseline_training.ckpt", "baseline")
        save_checkpoint(job.out / "baseline.pt", {"model": model.state_dict()})
    baseline_accuracy = evaluate_accuracy(model, *job.val, device=job.device)
    LOG.info("baseline: accuracy %.2f%%", baseline_accuracy)
    return baseline_accuracy


def _prune_with_gates(job: _PruneJob, dag, input_shape):
    """``--method dag``: trains the channel gates for ``--steps`` steps, then removes the closed
    channels; returns ``(pruned, history, gated accuracy, removed vs gated max difference)``."""
    from dagprune_algorithms.pruning import ChannelPruning

    args, device, val = job.args, job.device, job.val
    pruning = ChannelPruning(dag, input_shape, args.target, args.steps, block_size=args.block_size,
                             head_pruning=args.head_pruning)
    gated = pruning.prepare_for_pruning().to(device)
    LOG.info("channel groups: %d (%d prunable); prunable_proportion %.4f, "
             "max_removable_proportion %.4f", len(pruning.channel_groups),
             len(pruning.prunable_groups), pruning.prunable_proportion,
             pruning.max_removable_proportion)
    optimizer = torch.optim.Adam([{"params": pruning.weight_parameters(), "lr": args.lr},
                                  {"params": pruning.gate_parameters(), "lr": args.gate_lr}])

    def pruning_step(step, x, y):
        task_loss = F.cross_entropy(gated(x), y)
        proportion, flops_loss, entropy_loss, bkd_loss = \
            pruning.compute_current_proportion_and_pruning_losses(global_step=step)
        return StepResult(task_loss + flops_loss + entropy_loss + bkd_loss,
                          {"proportion": proportion.item(), "hard_proportion": pruning.current_hard_proportion(),
                           "task_loss": task_loss.item(), "flops_loss": flops_loss.item(),
                           "entropy_loss": entropy_loss.item(), "bkd_loss": bkd_loss.item()})

    def validate(step, logs):
        if step % 100 and step != args.steps - 1:
            return {}
        return {"val_accuracy": evaluate_accuracy(gated, *val, device=device) / 100.0}

    history: list = []
    train_steps(gated, optimizer, job.train, args.batch_size, args.seed + 1, args.steps,
                step_fn=pruning_step, checkpoint_path=job.out / "pruning.ckpt",
                checkpoint_every=args.checkpoint_every, device=device,
                progress=_progress(args, "pruning"), history=history, on_log=validate)
    gated.eval()
    pruned = pruning.remove_channels().to(device)
    removal_difference = dagprune.compare_module_outputs(gated, pruned, (4, *input_shape),
                                                         raise_error=False, device=device)
    gated_accuracy = evaluate_accuracy(gated, *val, device=device)
    return pruned, history, gated_accuracy, removal_difference


def _prune(job: _PruneJob, dag, input_shape):
    """Prunes ``dag`` by ``--method``; returns ``(pruned, history, gated accuracy, removal difference)``."""
    if job.args.method == "dag":
        return _prune_with_gates(job, dag, input_shape)
    from dagprune_algorithms.app.iterative_job import run_iterative_l1

    return run_iterative_l1(dag, input_shape, job.args, job.train, job.val, job.device, job.out,
                            _progress(job.args, "l1 pruning"))


def _finetune(job: _PruneJob, pruned) -> float:
    """Fine-tunes the pruned model for ``--finetune-steps``; returns its validation accuracy in percent."""
    args = job.args
    if args.finetune_steps:  # a tenth of the learning rate, gentle: weights already adapted
        _train_with_adam(job, pruned, args.lr / 10, args.seed + 2, args.finetune_steps, "finetune.ckpt",
                         "fine-tuning")
    pruned.eval()
    return evaluate_accuracy(pruned, *job.val, device=job.device)


def _reference_accuracy(job: _PruneJob, model) -> float:
    """Trains a copy of the unpruned model for the same total steps as the pruned one; returns its
    validation accuracy in percent."""
    args = job.args
    reference = copy.deepcopy(model).to(job.device)
    _train_with_adam(job, reference, args.lr, args.seed + 3, args.steps + args.finetune_steps, "reference.ckpt",
                     "reference")
    return evaluate_accuracy(reference, *job.val, device=job.device)


def _write_report(report: dict, out: Path, started: float) -> None:
    """Writes ``report.json`` and the plot of the pruning history; prints where they are."""
    from dagprune_algorithms.app.report import plot_training_history, write_json_report

    history = report["history"]
    write_json_report(out / "report.json", report)
    if history:
        plot_training_history(history, out / "pruning.png", target=report["target"])
    print(f"saved: {out / 'pruned'} (pruned DAG, load with dagprune.load_dag), {out / 'report.json'}"
          + (f", {out / 'pruning.png'}" if history else "") + f"; {time.time() - started:.0f} s")


def run_prune(args) -> int:
    """Runs the whole job; returns the exit code."""
    from dagprune_algorithms.app.models import create_timm_model
    from dagprune_algorithms.app.report import format_comparison_table

    _validate(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    started = time.time()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    split, train, val = _load_data(args)
    job = _PruneJob(args, train, val, device, out)
    input_shape = tuple(split.input_shape)
    model = create_timm_model(args.model, input_shape, num_classes=split.num_classes).to(device)
    if args.method == "l1":  # unit names, ratios and the FLOPs target fail now, not after the baseline
        from dagprune_algorithms.app.iterative_job import plan_from_arguments
        plan_from_arguments(dagprune.build_from_unstructured_module(model), input_shape, args)
    baseline_accuracy = _prepare_baseline(job, model, split.num_classes)

    dag = dagprune.build_from_unstructured_module(model)
    dagprune.compare_module_outputs(model, dag, (2, *input_shape), device=device)
    original_flops = dagprune.count_flops(dag, input_shape).total
    pruned, history, gated_accuracy, removal_difference = _prune(job, dag, input_shape)
    final_proportion = dagprune.count_flops(pruned, input_shape).total / original_flops
    LOG.info("pruned: FLOPs proportion %.4f (%s), accuracy before fine-tuning %.2f%%, "
             "removed model vs gated model max relative difference %.1e", final_proportion,
             "from --target-pruning-ratio" if args.target is None else f"target {args.target:.2f}",
             gated_accuracy, removal_difference)

    pruned_accuracy = _finetune(job, pruned)
    pruned.to("cpu").save(out / "pruned")
    reference_accuracy = None if args.no_reference else _reference_accuracy(job, model)

    model.to("cpu").eval()
    dag = dag.to("cpu")
    rows = [_measure(dag, f"{args.model} (baseline)", val, input_shape, original_flops, "cpu",
                     baseline_accuracy)]
    if reference_accuracy is not None:
        rows.append({**rows[0], "model": f"{args.model} (baseline, same total steps)",
                     "accuracy": reference_accuracy / 100.0})
    rows.append(_measure(pruned.to("cpu"), f"{args.model} (pruned, fine-tuned)", val, input_shape,
                         original_flops, "cpu", pruned_accuracy))
    print(format_comparison_table(rows))
    report = {"model": args.model, "data": split.name, "method": args.method, "target": args.target,
              "final_proportion": final_proportion, "removal_max_relative_difference": removal_difference,
              "accuracy_before_finetune": gated_accuracy, "rows": rows, "history": history,
              "arguments": {k: v for k, v in vars(args).items() if k != "run"},
              "elapsed_s": time.time() - started}
    _write_report(report, out, started)
    return 0
