"""The options of ``dagprune prune`` and their checks.

:func:`validate_prune_arguments` checks every option before any data is read or any step is
trained, so that a typo costs seconds, not a trained baseline: each failure is one
:class:`PruneUsageError` naming the option, the value and what to do.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from dagprune.errors import DagpruneError

from dagprune_algorithms.app.distributed import add_distributed_arguments
from dagprune_algorithms.app.iterative_job import DEFAULT_PRUNE_TIMES
from dagprune_algorithms.pruning.budgets import BUDGETS
from dagprune_algorithms.pruning.channel_groups import HEAD_PRUNING_MODES
from dagprune_algorithms.pruning.channel_pruning import TARGET_TOLERANCE
from dagprune_algorithms.pruning.importance import IMPORTANCE_CRITERIA

__all__ = ["DEFAULT_FLOPS_TARGET", "MAX_SEED", "PruneUsageError", "add_prune_arguments",
           "validate_prune_arguments", "check_images_fit_in_memory", "DISTILL_MODES"]

DEFAULT_FLOPS_TARGET = 0.5
"""``--target`` when neither it nor ``--target-pruning-ratio`` is given."""

MAX_SEED = 2 ** 32 - 1
"""Largest ``--seed``: the job derives generator seeds from it that must fit in 64 bits."""

MEMORY_SHARE = 0.5
"""Largest share of the machine's memory that the images of a run may take."""

_L1_ONLY_OPTIONS = (("--prune-times", "prune_times"), ("--step-epoch", "step_epoch"),
                    ("--target-pruning-ratio", "target_pruning_ratio"), ("--importance", "importance"))
"""``(flag, argument name)`` of the options that only ``--method l1`` uses."""

_INTEGER_MINIMUMS = (
    ("steps", 1, "the number of pruning steps"),
    ("baseline_steps", 0, "0 trains no baseline"),
    ("finetune_steps", 0, "0 skips fine-tuning"),
    ("batch_size", 1, "images per training step"),
    ("image_size", 1, "the height and width the images are resized to"),
    ("block_size", 1, "kept channel counts are multiples of it; 1 keeps any count"),
    ("checkpoint_every", 0, "0 checkpoints only at the end of each phase"),
    ("limit_train", 1, "leave it out to use every training image"),
    ("limit_val", 1, "leave it out to use every validation image"),
    ("seed", 0, f"a seed in 0..{MAX_SEED}"),
    ("grad_accum", 1, "micro-batches per optimizer step; 1 accumulates nothing"),
    ("min_channels", 1, "every group keeps at least this many channels"),
    ("round_to", 1, "kept channel counts are multiples of it; 1 keeps any count"),
)
"""``(argument name, smallest value, what it means)`` of the integer options."""

_POSITIVE_RATES = (("lr", "the learning rate of the weights"), ("gate_lr", "the learning rate of the gates"))


class PruneUsageError(DagpruneError):
    """An argument of ``dagprune prune`` cannot be honoured."""


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of ``dagprune prune``."""
    parser.add_argument("--model", default="test_resnet", help="timm model name (pretrained=False)")
    parser.add_argument("--data-dir", default=None,
                        help="image folder (one subfolder per class; images that cannot be decoded "
                             "are skipped with a warning) or a folder of MNIST-style IDX files; "
                             "default: scikit-learn's built-in digits")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--target", type=float, default=None,
                        help=f"target FLOPs (or --budget's cost) as a fraction of the original, in (0, 1) (default "
                             f"{DEFAULT_FLOPS_TARGET}); a pruned model above it by more than "
                             f"{TARGET_TOLERANCE} is saved and reported, and the command exits with 1; "
                             "not with --target-pruning-ratio")
    parser.add_argument("--budget", choices=BUDGETS, default="flops",
                        help="what --target is a share of: flops, params (the parameter count, exact) or "
                             "latency (predicted by a latency table timed on --device at the report's batch; "
                             "an approximation, see resources/budgets.md); --method dag only")
    parser.add_argument("--latency-cache", default=None, metavar="DIR",
                        help="where --budget latency keeps its latency tables (default: "
                             "~/.cache/dagprune/latency); a table measured once for the model, input size, "
                             "device and torch version is read from there")
    parser.add_argument("--method", choices=["dag", "l1"], default="dag",
                        help="dag: differentiable gates with FLOPs/entropy/distillation losses; "
                             "l1: iterative pruning (mmrazor's ItePruneAlgorithm), channels ranked "
                             "by --importance")
    parser.add_argument("--steps", type=int, default=200, help="pruning steps")
    _add_l1_arguments(parser)
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
    parser.add_argument("--seed", type=int, default=0, help=f"0..{MAX_SEED}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="mixed precision for every training phase: torch.autocast with bfloat16, "
                             "or float16 with a gradient scaler (default: none, float32)")
    parser.add_argument("--out", default="out/prune",
                        help="output directory. Rerunning the same command with the same --out "
                             "resumes an interrupted run from its checkpoints (a finished run is "
                             "reported again without training); a rerun whose arguments change the "
                             "results (--seed, --steps, --baseline-steps, ...; not --out, "
                             "--checkpoint-every, --no-progress, --no-reference) is refused with exit "
                             "code 2 naming them: give it another --out")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_distributed_arguments(parser)  # --grad-accum, --distributed: several processes (torchrun)
    _add_trained_model_arguments(parser)


def _add_l1_arguments(parser: argparse.ArgumentParser) -> None:
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


# ------------------------------------------------------------------ trained models (issue 19)
DISTILL_MODES = ("auto", "on", "off")
"""``--distill``: auto distils when ``--checkpoint`` is given."""


def _add_trained_model_arguments(parser: argparse.ArgumentParser) -> None:
    trained = parser.add_argument_group(
        "trained models", "start from your weights, leave layers alone, distil from the unpruned model")
    trained.add_argument("--checkpoint", default=None, metavar="FILE|DIR",
                         help="trained weights loaded into --model before conversion (no baseline is "
                              "trained): a safetensors state dict, a torch file (a state dict, or a dict "
                              "with 'state_dict', 'model' or 'state_dict_ema'; a 'module.' prefix is "
                              "stripped; read with weights_only=True), or a DAG directory saved by "
                              "dagprune, used as it is")
    trained.add_argument("--exclude", action="extend", nargs="+", default=None, metavar="MODULE",
                         help="module paths (head.fc) or fnmatch patterns (stem*, layer1.*) to leave "
                              "alone: the channels flowing into or out of them are not pruned")
    trained.add_argument("--min-channels", type=int, default=1, metavar="N",
                         help="fewest channels every channel group keeps (--method dag)")
    trained.add_argument("--round-to", type=_round_to, default="auto", metavar="N|auto",
                         help="kept channel counts are multiples of N in groups of at least N channels "
                              "(--method dag; not with --block-size). auto (the default): the multiple this "
                              "device runs fast, from a width table timed once and cached in "
                              "~/.cache/dagprune/latency ($DAGPRUNE_CACHE); 1 with --block-size; "
                              "--round-to 1 keeps any count")
    trained.add_argument("--distill", choices=DISTILL_MODES, default="auto",
                         help="add a logit distillation loss from the unpruned model (a frozen teacher in "
                              "eval mode) while pruning and fine-tuning; auto: on with --checkpoint")
    trained.add_argument("--distill-temperature", type=float, default=2.0, metavar="T",
                         help="softmax temperature of the distillation loss (> 0)")
    trained.add_argument("--distill-weight", type=float, default=1.0, metavar="W",
                         help="weight of the distillation loss, added to the task loss (>= 0)")


def _round_to(text: str) -> int | str:
    """``--round-to``'s value: ``auto`` or an int."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or auto, got {text!r}") from None


def _check_trained_model_options(args: argparse.Namespace) -> None:
    if args.checkpoint is not None:
        if not Path(args.checkpoint).exists():
            raise PruneUsageError(f"--checkpoint {args.checkpoint}: no such file or directory; give a "
                                  ".safetensors or torch file of --model's weights, or a saved DAG directory")
        if args.baseline_checkpoint is not None:
            raise PruneUsageError("--checkpoint and --baseline-checkpoint both give the unpruned model's "
                                  "weights; give one")
    if args.round_to != "auto" and args.round_to > 1 and args.block_size > 1:
        raise PruneUsageError(f"--round-to {args.round_to} and --block-size {args.block_size} both set the "
                              "multiple kept channel counts come in; give one")
    if not (math.isfinite(args.distill_temperature) and args.distill_temperature > 0):
        raise PruneUsageError(f"--distill-temperature must be a number > 0, got {args.distill_temperature}")
    if not (math.isfinite(args.distill_weight) and args.distill_weight >= 0):
        raise PruneUsageError(f"--distill-weight must be a number >= 0, got {args.distill_weight}")


def validate_prune_arguments(args: argparse.Namespace) -> None:
    """Checks the arguments before any work; fills in the default ``--target``.

    Raises:
        PruneUsageError: an option is out of range or cannot be honoured here (the message
            names it and says what to do).
        UnknownModelError: ``--model`` is not a timm model name (the closest are listed).
    """
    from dagprune_algorithms.app.models import check_timm_model_name

    _check_numbers(args)
    check_timm_model_name(args.model)
    _check_pruning_goal(args)
    _check_device(args.device)
    _check_sharding(args)
    check_output_directory(Path(args.out))
    _check_trained_model_options(args)
    if args.baseline_checkpoint is not None and not Path(args.baseline_checkpoint).is_file():
        raise PruneUsageError(f"--baseline-checkpoint {args.baseline_checkpoint}: no such file; give the "
                              "baseline.pt of a previous run, or leave the option out to train a baseline")


def _check_numbers(args: argparse.Namespace) -> None:
    for name, minimum, meaning in _INTEGER_MINIMUMS:
        value = getattr(args, name)
        if value is not None and value != "auto" and value < minimum:
            bound = "positive" if minimum == 1 else f">= {minimum}"
            raise PruneUsageError(f"--{name.replace('_', '-')} must be {bound} ({meaning}), got {value}")
    if args.seed > MAX_SEED:
        raise PruneUsageError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    for name, meaning in _POSITIVE_RATES:
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise PruneUsageError(f"--{name.replace('_', '-')} must be a number > 0 ({meaning}), got {value}; "
                                  "the defaults are 2e-3 (--lr) and 5e-2 (--gate-lr)")


def _check_pruning_goal(args: argparse.Namespace) -> None:
    """The method, the FLOPs target or per-unit ratios, and the l1 schedule."""
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
    _check_budget_options(args)
    if args.method == "l1":
        from dagprune_algorithms.app.iterative_job import iterative_schedule, parse_target_pruning_ratio

        try:
            iterative_schedule(args.steps, args.prune_times, args.step_epoch, args.importance or "l1")
            parse_target_pruning_ratio(args.target_pruning_ratio)
        except DagpruneError as error:
            raise PruneUsageError(str(error)) from error


def _check_budget_options(args: argparse.Namespace) -> None:
    """``--budget`` with ``--method dag`` only; ``--latency-cache`` with ``--budget latency`` only, a
    directory or a path where one can be created."""
    if args.budget != "flops" and args.method != "dag":
        raise PruneUsageError(f"--budget {args.budget} applies to --method dag only (--method {args.method} prunes "
                              "to a FLOPs target); drop --budget or use --method dag")
    if args.latency_cache is None:
        return
    if args.budget != "latency":
        raise PruneUsageError(f"--latency-cache applies to --budget latency only (got --budget {args.budget}); "
                              "add --budget latency or drop --latency-cache")
    cache = Path(args.latency_cache)
    blocker = next((p for p in (cache, *cache.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise PruneUsageError(f"--latency-cache {cache}: {blocker} is a file; give a directory (it is created "
                              "if missing)")


def _check_sharding(args: argparse.Namespace) -> None:
    """``--fsdp`` shards the gated model of ``--method dag``, and its processes must skip or take
    each step alike (which fp16's gradient scaler decides per process, from its own shards)."""
    if not args.fsdp:
        return
    if args.method != "dag":
        raise PruneUsageError(f"--fsdp shards the gated model of --method dag; --method {args.method} trains with "
                              "DistributedDataParallel: drop --fsdp (torchrun still runs it on several processes)")
    if args.amp == "fp16":
        raise PruneUsageError("--fsdp with --amp fp16: the gradient scaler would check each process's shard of "
                              "the gradients alone, and the processes could skip different steps; use --amp bf16 "
                              "(no scaler) or --amp none")


def _check_device(name: str) -> None:
    """``--device``: cpu, an available CUDA device, or mps where available."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise PruneUsageError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PruneUsageError(f"--device {name} asked for, but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PruneUsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                                  f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise PruneUsageError(f"--device {name} asked for, but MPS is not available; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise PruneUsageError(f"--device {name}: dagprune prune trains on cpu, cuda or cuda:N (or mps)")


def check_output_directory(out: Path) -> None:
    """Checks that ``out`` is, or can be created as, a writable directory.

    Raises:
        PruneUsageError: ``out`` or one of its parents is a file, or the nearest existing
            directory is not writable.
    """
    for existing in (out, *out.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            where = "is a file" if existing == out else f"is below {existing}, a file"
            raise PruneUsageError(f"--out {out} {where}; --out must be a directory (it is created "
                                  "if missing): choose another path")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PruneUsageError(f"--out {out}: {existing} is not writable; choose a directory you can "
                                  "write to")
        return


def check_images_fit_in_memory(args: argparse.Namespace) -> None:
    """Refuses an ``--image-size`` whose images would take over :data:`MEMORY_SHARE` of the
    machine's memory (the job holds every image of the run as float32).

    Raises:
        PruneUsageError: the estimate is too large; the message gives it and what to lower.
        DataError: ``--data-dir`` cannot be read.
    """
    from dagprune_algorithms.app.data import count_samples

    total, resized_before_limits = count_samples(args.data_dir)
    kept = min(total, (args.limit_train or total) + (args.limit_val or total))
    pixels = args.image_size ** 2
    needed = 4 * pixels * (3 * kept + (total if resized_before_limits else kept))
    available = _physical_memory_bytes()
    if available and needed > MEMORY_SHARE * available:
        raise PruneUsageError(f"--image-size {args.image_size} needs about {needed / 2 ** 30:.1f} GiB to hold "
                              f"the images at that size, more than {MEMORY_SHARE:.0%} of this machine's "
                              f"{available / 2 ** 30:.1f} GiB; lower --image-size, --limit-train or --limit-val")


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None
