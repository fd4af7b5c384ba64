"""``dagprune prune --method l1``: the iterative schedule from the command line, and its
checkpointed training loop.

The library part (:mod:`dagprune_algorithms.pruning.iterative`) takes plain arguments; this
module reads them from the parsed ``dagprune prune`` arguments, chooses the default schedule,
reads ``--target-pruning-ratio`` files, and trains the masked model with the app's exact-resume
loop (:func:`~dagprune_algorithms.app.training.train_steps`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from dagprune import DagModule, compare_module_outputs
from dagprune.errors import PruningError

from dagprune_algorithms.app.distillation import distillation_logs, distillation_loss
from dagprune_algorithms.app.distributed import SINGLE_PROCESS, Ranks
from dagprune_algorithms.app.training import StepResult, evaluate_accuracy, train_steps
from dagprune_algorithms.pruning.iterative import GRADIENT_IMPORTANCE, IterativePlan, plan_iterative_pruning
from dagprune_algorithms.pruning.units import ChannelUnitError

__all__ = ["DEFAULT_PRUNE_TIMES", "iterative_schedule", "parse_target_pruning_ratio", "plan_from_arguments",
           "describe_plan", "run_iterative_l1"]

DEFAULT_PRUNE_TIMES = 5
"""Prunes of ``dagprune prune --method l1`` when the arguments name none."""

LOG = logging.getLogger("dagprune.prune")


def iterative_schedule(steps: int, prune_times: int | None = None, step_epoch: int | None = None,
                       importance: str = "l1") -> tuple[int, int]:
    """``(prune_times, step_epoch)`` of ``dagprune prune --method l1`` for a run of ``steps``.

    Defaults: ``prune_times`` is :data:`DEFAULT_PRUNE_TIMES`, lowered to what fits in ``steps``;
    ``step_epoch`` is ``steps // prune_times`` (at least 1), so the prunes are equally spaced.

    Args:
        steps: the run's ``--steps``.
        prune_times, step_epoch: ``--prune-times`` and ``--step-epoch``, or None for the defaults.
        importance: ``--importance``.

    Returns:
        ``(prune_times, step_epoch)``.

    Raises:
        PruningError: a value below 1, a last prune at or after ``steps``, or "taylor" with
            fewer than 2 steps (its first prune waits for a training step).

    >>> iterative_schedule(100), iterative_schedule(100, prune_times=3), iterative_schedule(3)
    ((5, 20), (3, 33), (3, 1))
    >>> iterative_schedule(100, step_epoch=30)
    (4, 30)
    """
    for flag, value in (("--prune-times", prune_times), ("--step-epoch", step_epoch)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PruningError(f"{flag} must be an int >= 1, got {value!r}")
    if importance == GRADIENT_IMPORTANCE and steps < 2:
        raise PruningError(f"--importance {GRADIENT_IMPORTANCE} needs --steps >= 2 (got {steps}): its first "
                           "prune waits for the gradients of one training step")
    if prune_times is None:
        fitting = steps if step_epoch is None else (steps - 1) // step_epoch + 1
        prune_times = max(1, min(DEFAULT_PRUNE_TIMES, fitting))
    if step_epoch is None:
        step_epoch = max(1, steps // prune_times)
    last_prune = (prune_times - 1) * step_epoch
    if last_prune >= steps:
        raise PruningError(f"--prune-times {prune_times} with --step-epoch {step_epoch} puts the last prune at "
                           f"step {last_prune}, but the run has --steps {steps} (steps 0 to {steps - 1}); "
                           "lower --prune-times or --step-epoch, or raise --steps")
    return prune_times, step_epoch


def parse_target_pruning_ratio(value: Any) -> float | dict | None:
    """``--target-pruning-ratio``: one kept share for every unit, or ``{unit name: choice}``.

    Args:
        value: a number in (0, 1], a mapping, or text: a number, or the path of a JSON file
            holding ``{unit name: choice}`` (what ``dagprune units MODEL --choice -o FILE``
            writes); None stays None.

    Returns:
        The share as a float, ``{unit name: choice}``, or None.

    Raises:
        PruningError: a number out of (0, 1], a file that does not exist or is not a JSON
            object of unit names to numbers.

    >>> parse_target_pruning_ratio("0.7"), parse_target_pruning_ratio({"conv_(0, 8)_8": 0.5})
    (0.7, {'conv_(0, 8)_8': 0.5})
    """
    if value is None or isinstance(value, Mapping):
        return None if value is None else dict(value)
    ratio = value
    if isinstance(value, str):
        try:
            ratio = float(value)
        except ValueError:
            return _read_unit_ratios(value)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise PruningError(f"--target-pruning-ratio must be in (0, 1] (the fraction of each unit's channels "
                           f"kept) or a JSON file of {{unit name: fraction}}, got {value!r}")
    return float(ratio)


def _read_unit_ratios(path: str) -> dict:
    if not Path(path).is_file():
        raise PruningError(f"--target-pruning-ratio {path!r} is neither a number nor a JSON file; give a "
                           "fraction such as 0.7 or a file written by `dagprune units MODEL --choice -o FILE`")
    try:
        ratios = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PruningError(f"--target-pruning-ratio {path}: not valid JSON ({error})") from error
    if not isinstance(ratios, dict) or not ratios or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in ratios.values()):
        raise PruningError(f"--target-pruning-ratio {path}: expected a non-empty JSON object {{unit name: "
                           "fraction kept}}, as `dagprune units MODEL --choice -o FILE` writes")
    return ratios


def plan_from_arguments(dag: DagModule, input_shape: Sequence[int], args) -> IterativePlan:
    """The units, targets and schedule of ``dagprune prune --method l1`` on ``dag``.

    Args:
        dag: the model to prune.
        input_shape: its input shape without batch.
        args: the parsed ``dagprune prune`` arguments: ``steps``, ``target``, ``block_size`` and,
            optionally, ``prune_times``, ``step_epoch``, ``target_pruning_ratio`` (see
            :func:`parse_target_pruning_ratio`), ``importance`` (default "l1"),
            ``head_pruning`` and ``model`` (named in errors).

    Returns:
        The plan of :func:`~dagprune_algorithms.pruning.iterative.plan_iterative_pruning`.

    Raises:
        PruningError: a bad schedule, ratio or FLOPs target.
        ChannelUnitError: a unit name of the ratio file that the model does not have (the
            closest names and the command printing this model's names are given) or a ratio
            out of range.
    """
    importance = getattr(args, "importance", None) or "l1"
    prune_times, step_epoch = iterative_schedule(args.steps, getattr(args, "prune_times", None),
                                                 getattr(args, "step_epoch", None), importance)
    given_ratio = getattr(args, "target_pruning_ratio", None)
    ratio = parse_target_pruning_ratio(given_ratio)
    try:
        return plan_iterative_pruning(dag, input_shape, prune_times=prune_times, step_epoch=step_epoch,
                                      target=args.target if ratio is None else None,
                                      target_pruning_ratio=ratio, block_size=args.block_size,
                                      importance=importance, head_pruning=getattr(args, "head_pruning", "dims"),
                                      exclude=getattr(args, "exclude", None) or ())
    except ChannelUnitError as error:
        if ratio is None:
            raise
        source = given_ratio if isinstance(given_ratio, str) else "(a dict)"
        units_command = (f"dagprune units {getattr(args, 'model', 'MODEL')} --choice --input-size "
                         f"{' '.join(map(str, input_shape))}")
        raise ChannelUnitError(f"--target-pruning-ratio {source}: {error}; `{units_command}` prints this "
                               "model's unit names") from error


def describe_plan(plan: IterativePlan, flops_target: float | None = None) -> str:
    """One line for the log: units, importance, kept shares, predicted FLOPs, schedule."""
    ratios = sorted(set(plan.target_pruning_ratio.values()))
    kept = f"{ratios[0]:.4f}" if len(ratios) == 1 else f"{ratios[0]:.3f} to {ratios[-1]:.3f}"
    units = plan.mutator.units
    importance = "" if plan.importance == "l1" else f", importance {plan.importance!r}"
    if flops_target is None:
        goal = (f"keeping {kept} of the channels of {len(plan.target_pruning_ratio)} units "
                f"(--target-pruning-ratio) gives FLOPs proportion {plan.predicted_flops_proportion:.4f}")
    else:
        goal = (f"keeping {kept} of each unit's channels gives FLOPs proportion "
                f"{plan.predicted_flops_proportion:.4f} (target {flops_target:.2f})")
    return (f"{len(units)} units ({sum(unit.mutable for unit in units)} prunable){importance}; {goal}; "
            f"{plan.prune_times} prunes every {plan.step_epoch} steps")


def run_iterative_l1(dag: DagModule, input_shape: Sequence[int], args, train, val, device, out,
                     progress=None, distiller=None, ranks: Ranks = SINGLE_PROCESS):
    """``dagprune prune --method l1``: iterative pruning (ItePruneAlgorithm) to a FLOPs target or
    per-unit ratios, then export.

    The targets, importance and schedule come from :func:`plan_from_arguments`: by default
    one kept ratio for every unit (uniform, evened out on small units) so that the pruned model
    has ``args.target`` of the FLOPs (within 0.02); with ``args.target_pruning_ratio`` (a
    fraction or ``{unit name: fraction}``) those ratios instead. Kept counts are multiples of
    ``args.block_size``. The model is pruned ``args.prune_times`` times (default 5, at most
    what fits in ``args.steps``) every ``args.step_epoch`` steps (default ``steps //
    prune_times``), training the masked model with Adam in between (checkpointed into ``out``,
    so a stopped run resumes exactly), then the channels are removed. The masked model shares
    ``dag``'s weights, so ``dag`` is trained in place (as with the gated method).

    Args:
        dag: the model to prune; input_shape: its input shape without batch.
        args: the parsed ``dagprune prune`` arguments (see :func:`plan_from_arguments`; also
            ``lr``, ``batch_size``, ``seed``, ``checkpoint_every``).
        train, val: ``(inputs, labels)`` tensors.
        device: where to train; out: the output directory (checkpoint ``l1_pruning.ckpt``).
        progress: a tqdm-like callable wrapping the step iterator.
        distiller: a :class:`~.distillation.Distiller` adding its loss to every step, or None.
        ranks: the processes training together (DistributedDataParallel on the masked model;
            Taylor scores averaged over them; rank 0 writes the checkpoint).

    Returns:
        ``(pruned DAG, history, masked-model validation accuracy in percent, max relative
        difference between the removed and the masked model)``.
    """
    plan = plan_from_arguments(dag, input_shape, args)
    flops_target = None if getattr(args, "target_pruning_ratio", None) is not None else args.target
    LOG.info("l1: %s", describe_plan(plan, flops_target))
    algorithm = plan.create_algorithm().to(device)
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=args.lr)
    trained = ranks.wrap(algorithm.architecture)

    def validate(step, logs):
        if step % 100 and step != args.steps - 1:
            return {}
        return {"val_accuracy": evaluate_accuracy(algorithm, *val, device=device, ranks=ranks) / 100.0}

    history: list = []
    train_steps(algorithm, optimizer, train, args.batch_size, args.seed + 1, args.steps,
                step_fn=_l1_step(algorithm, trained, flops_target, distiller),
                checkpoint_path=Path(out) / "l1_pruning.ckpt", checkpoint_every=args.checkpoint_every,
                device=device, progress=progress, history=history, on_log=validate, amp=args.amp,
                grad_accum=getattr(args, "grad_accum", 1), ranks=ranks, ddp_model=trained,
                before_step=algorithm.maybe_prune, after_step=_taylor_score_sharing(algorithm, ranks))
    algorithm.eval()
    masked = algorithm.architecture
    accuracy = evaluate_accuracy(masked, *val, device=device, ranks=ranks)
    pruned = algorithm.remove_channels().to(device)
    difference = compare_module_outputs(masked, pruned, (4, *input_shape), raise_error=False, device=device)
    return pruned, history, accuracy, difference


def _l1_step(algorithm, trained, flops_target: float | None, distiller):
    """The step function of ``--method l1``: cross-entropy (plus distillation) of ``trained``, the
    masked model of ``algorithm`` (or its DistributedDataParallel). The prunes happen between
    steps (``algorithm.maybe_prune`` before each step's first micro-batch)."""
    proportion_at: dict[int, float] = {}

    def current_proportion() -> float:
        done = int(algorithm.prunes_done)
        if done not in proportion_at:
            proportion_at[done] = algorithm.mutator.flops_proportion()
        return proportion_at[done]

    def pruning_step(step, x, y):
        logits = trained(x)
        task_loss = F.cross_entropy(logits, y)
        distill_loss = distillation_loss(distiller, logits, x)
        return StepResult(task_loss + distill_loss, lambda: {
            "proportion": current_proportion(), "target": flops_target, "task_loss": task_loss.item(),
            "prunes_done": int(algorithm.prunes_done), **distillation_logs(distiller, distill_loss)})
    return pruning_step


def _taylor_score_sharing(algorithm, ranks: Ranks):
    """The ``after_step`` of ``--importance taylor`` with several processes (None otherwise).

    Each rank's hooks add |weight x gradient| of its own batches to the score sums; averaging
    them over the ranks after every step makes every rank rank the channels alike at the next
    prune, and makes rank 0's sums, which the checkpoint holds, every rank's.
    """
    scores = algorithm.taylor_scores
    if not ranks.distributed or scores is None:
        return None
    sums = [buffer for buffer in scores.buffers() if buffer.is_floating_point()]

    def share(step: int) -> None:
        for score_sum in sums:
            ranks.mean_(score_sum)
    return share
