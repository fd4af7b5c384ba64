"""Iterative pruning on a schedule (mmrazor's ``ItePruneAlgorithm``) and ``dagprune prune --method l1``.

The model is pruned ``prune_times`` times, at step 0 and every ``step_epoch`` steps after it
(a "step" is whatever the caller counts: epochs or iterations). Prune ``k`` (0-based) sets every
unit of ``target_pruning_ratio`` to ``full - (full - target) * (k + 1) / prune_times``, so the
kept fraction falls linearly and the last prune reaches the target; each prune re-ranks the
channels by the units' importance (L1 norm by default) on the current weights. Between prunes
the masked model trains as usual. The masks are buffers of the masked model and the number of
prunes done is a buffer of the algorithm, so ``algorithm.state_dict()`` (with the optimizer's)
is all a run needs to resume exactly.

Units with ``importance="taylor"`` rank their channels by ``|sum(weight x gradient)|`` per
filter, averaged over the backward passes since the previous prune (a
:class:`~.importance.TaylorScoreAccumulator`, whose sums are buffers too). A prune needs at
least one such pass: one due before any (the prune at step 0) waits for the first call after a
training step, so it comes at step 1. :meth:`ItePruneAlgorithm.remove_channels` exports the
slim model through the same removal as :class:`ChannelPruning`.

A plain PyTorch loop:

>>> import dagprune, torch
>>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
>>> algorithm = ItePruneAlgorithm(dagprune.build_from_unstructured_module(model),
...                               target_pruning_ratio=0.5, step_epoch=2, prune_times=2,
...                               input_shape=(3, 8, 8))
>>> optimizer = torch.optim.SGD(algorithm.parameters(), lr=0.1)
>>> for epoch in range(4):
...     pruned_now = algorithm.maybe_prune(epoch)
...     loss = algorithm(torch.randn(2, 3, 8, 8)).square().mean()
...     optimizer.zero_grad(); loss.backward(); optimizer.step()
...     print(epoch, pruned_now, algorithm.mutator.current_choices)
0 True {'0_(0, 16)_16': 0.75}
1 False {'0_(0, 16)_16': 0.75}
2 True {'0_(0, 16)_16': 0.5}
3 False {'0_(0, 16)_16': 0.5}
>>> algorithm.remove_channels().vertex("_0").module.out_channels
8
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dagprune import DagModule
from dagprune.errors import PruningError

from dagprune_algorithms.pruning.importance import TaylorScoreAccumulator, channel_importance
from dagprune_algorithms.pruning.units import ChannelMutator, ChannelUnitError

__all__ = ["ItePruneAlgorithm", "choices_for_flops_target", "run_iterative_l1", "DEFAULT_PRUNE_TIMES",
           "FLOPS_TARGET_TOLERANCE", "IterativePlan", "plan_iterative_pruning", "iterative_schedule",
           "parse_target_pruning_ratio"]

GRADIENT_IMPORTANCE = "taylor"
"""The importance criterion ranked from gradients accumulated while training."""

DEFAULT_PRUNE_TIMES = 5
"""Prunes of ``dagprune prune --method l1`` when the arguments name none."""

FLOPS_TARGET_TOLERANCE = 0.02
"""Largest ``|achieved FLOPs proportion - target|`` accepted by :func:`choices_for_flops_target`."""

LOG = logging.getLogger("dagprune.prune")


class ItePruneAlgorithm(nn.Module):
    """Prunes a model iteratively to a target while it trains.

    Args:
        architecture: the model (a :class:`DagModule`; an ``nn.Module`` is converted first).
        mutator_cfg: a :class:`ChannelMutator` config (see ``ChannelMutator.config_template``)
            or a ChannelMutator, prepared on ``architecture`` or not. Default: L1 units in
            ratio mode, found by the channel analysis.
        target_pruning_ratio: the choice each unit reaches (the fraction of channels *kept* in
            ratio mode): one value for every mutable unit, or ``{unit name: choice}`` (units
            not named are not pruned).
        step_epoch: steps between two prunes.
        prune_times: prunes to reach the target.
        input_shape: input shape without batch for the analysis (overrides ``parse_cfg``).

    Attributes:
        architecture: the masked model to train (shares the weights of ``architecture``).
        mutator: the :class:`ChannelMutator` holding the units.
        taylor_scores: the :class:`~.importance.TaylorScoreAccumulator` of the units of
            ``target_pruning_ratio`` with ``importance="taylor"`` (None if there are none).

    Raises:
        ChannelUnitError: an unknown unit name (the closest are listed) or an out-of-range target.
        PruningError: ``step_epoch`` or ``prune_times`` is not a positive int.
    """

    def __init__(self, architecture: nn.Module, mutator_cfg: Mapping | ChannelMutator | None = None,
                 target_pruning_ratio: float | Mapping[str, Any] | None = None, step_epoch: int = 1,
                 prune_times: int = 1, input_shape: Sequence | None = None):
        super().__init__()
        for name, value in (("step_epoch", step_epoch), ("prune_times", prune_times)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PruningError(f"{name} must be a positive int, got {value!r}")
        if target_pruning_ratio is None:
            raise PruningError("target_pruning_ratio is required: one choice for every unit (e.g. 0.7 "
                               "keeps 70% of each unit's channels) or {unit name: choice}; "
                               "`dagprune units MODEL --choice` prints the unit names")
        mutator = self._prepared_mutator(architecture, mutator_cfg, input_shape)
        self.mutator = mutator
        self.architecture = mutator.masked_model
        self.step_epoch = step_epoch
        self.prune_times = prune_times
        if isinstance(target_pruning_ratio, Mapping):
            targets = dict(target_pruning_ratio)
        else:
            targets = {unit.name: target_pruning_ratio for unit in mutator.mutable_units}
        for name, value in targets.items():
            mutator.unit(name).kept_count(value)  # checks the name and the range
        self.target_pruning_ratio = targets
        self.register_buffer("prunes_done", torch.zeros((), dtype=torch.long))
        self._gradient_ranked_units = [name for name in targets
                                       if mutator.unit(name).importance == GRADIENT_IMPORTANCE]
        self.taylor_scores = None
        if self._gradient_ranked_units:
            self.taylor_scores = TaylorScoreAccumulator(
                mutator.analysis, [mutator.group_of(name) for name in self._gradient_ranked_units])
        self._told_prune_waits = False

    @staticmethod
    def _prepared_mutator(architecture, mutator_cfg, input_shape) -> ChannelMutator:
        if isinstance(mutator_cfg, ChannelMutator):
            mutator = mutator_cfg
            if mutator.masked_model is not None:
                if mutator.dag is not architecture:
                    raise PruningError("the ChannelMutator given was prepared on another model; pass "
                                       "that model as architecture, or an unprepared mutator")
                return mutator
            if input_shape is not None:
                mutator.input_shape = tuple(d if isinstance(d, int) else tuple(d) for d in input_shape)
        else:
            config = copy.deepcopy(dict(mutator_cfg or {"channel_unit_cfg": {"type": "L1ChannelUnit"}}))
            if input_shape is not None:
                parse = dict(config.get("parse_cfg") or {"type": "ChannelAnalysis"})
                parse["input_shape"] = list(input_shape)
                config["parse_cfg"] = parse
            mutator = ChannelMutator.from_config(config)
        mutator.prepare_from_supernet(architecture)
        return mutator

    def forward(self, *args, **kwargs):
        return self.architecture(*args, **kwargs)

    # -- schedule ----------------------------------------------------------------------------------
    @property
    def prune_steps(self) -> list[int]:
        """The steps at which prunes are due (with "taylor" units the one at step 0 comes at the
        first call after a training step)."""
        return [k * self.step_epoch for k in range(self.prune_times)]

    @property
    def done(self) -> bool:
        """Whether the last prune has happened."""
        return int(self.prunes_done) >= self.prune_times

    def scheduled_choices(self, prune_index: int) -> dict:
        """The choices of prune ``prune_index`` (0-based), linear from full to the target."""
        if not 0 <= prune_index < self.prune_times:
            raise PruningError(f"prune_index must be in [0, {self.prune_times}), got {prune_index}")
        fraction = (prune_index + 1) / self.prune_times
        choices = {}
        for name, target in self.target_pruning_ratio.items():
            unit = self.mutator.unit(name)
            if prune_index == self.prune_times - 1:
                choices[name] = target
                continue
            value = unit.full_choice - (unit.full_choice - target) * fraction
            choices[name] = value if unit.choice_mode == "ratio" else max(1, math.floor(value + 0.5))
        return choices

    def maybe_prune(self, step: int) -> bool:
        """Prunes if a prune is due at ``step``; returns whether it pruned.

        Call it once per step (or epoch) before the forward pass. Calling it again for the
        same step does nothing; a call after skipped steps applies the latest prune due. Units
        with ``importance="taylor"`` are ranked by the Taylor scores averaged since the previous
        prune; while no backward pass has run since then, a due prune waits (returns False).
        """
        if self.done:
            if self.taylor_scores is not None:
                self.taylor_scores.remove_hooks()
            return False
        due = [k for k in range(int(self.prunes_done), self.prune_times) if k * self.step_epoch <= step]
        if not due:
            return False
        scores = None
        if self.taylor_scores is not None:
            if not self.taylor_scores.ready:
                if not self._told_prune_waits:
                    LOG.info("prune %d (due at step %d) waits for a training step: units with importance "
                             "'taylor' are ranked by gradients", due[-1] + 1, due[-1] * self.step_epoch)
                    self._told_prune_waits = True
                return False
            scores = {name: self.taylor_scores.importance(self.mutator.group_of(name))
                      for name in self._gradient_ranked_units}
            self.taylor_scores.reset()
        self.mutator.set_choices(self.scheduled_choices(due[-1]), scores=scores)
        self.prunes_done.fill_(due[-1] + 1)
        if self.done and self.taylor_scores is not None:
            self.taylor_scores.remove_hooks()
        return True

    def remove_channels(self) -> DagModule:
        """The slim model: computes what :attr:`architecture` computes in eval mode."""
        return self.mutator.remove_channels()


def choices_for_flops_target(mutator: ChannelMutator, target: float,
                             tolerance: float = FLOPS_TARGET_TOLERANCE,
                             scores: Mapping[str, Any] | None = None) -> tuple[dict, float]:
    """Choices (ratio mode) for every mutable unit whose pruned model has ``target`` of the
    FLOPs, within ``tolerance``, predicted with the channels ranked by the current importance
    (or by ``scores``, ``{unit name: importance per channel}``, for the units it names).

    One uniform ratio is found by bisection. Where the kept counts of small units jump over
    the target, the choices are then evened out one step at a time: from the uniform ratio
    just above the target, the unit keeping the largest share gives up one allowed count until
    the FLOPs are within ``tolerance``.

    Returns:
        ``({unit name: choice}, predicted FLOPs proportion)``.

    Raises:
        PruningError: the target is below what keeping the fewest channels allows, or no
            choices get within ``tolerance`` (e.g. with a large divisor).
    """
    units = mutator.mutable_units
    if not units:
        raise PruningError(f"{mutator.dag.name} has no prunable channel unit")
    not_ratio = [unit.name for unit in units if unit.choice_mode != "ratio"]
    if not_ratio:
        raise PruningError(f"choices_for_flops_target needs choice_mode 'ratio'; {not_ratio[:3]} are not")
    if scores is None:
        scores = mutator.channel_scores()
    else:
        given = dict(scores)
        scores = {unit.name: given[unit.name] if unit.name in given
                  else unit.channel_scores(mutator.analysis, mutator.group_of(unit.name)) for unit in units}

    def proportion(choices: dict) -> float:
        return mutator.flops_proportion(choices, scores)

    def uniform(ratio: float) -> dict:
        return {unit.name: ratio for unit in units}

    fewest = {unit.name: unit.allowed_counts()[0] / unit.num_channels for unit in units}
    lowest = proportion(fewest)
    if lowest >= target - tolerance:
        if lowest - target > tolerance:
            raise PruningError(f"FLOPs target {target:.3f} cannot be reached: keeping the fewest channels "
                               f"allowed in every unit leaves {lowest:.3f} of the FLOPs; choose a target "
                               f">= {lowest:.3f}")
        return fewest, lowest
    low, high = 0.0, 1.0  # proportion(uniform(low)) < target <= proportion(uniform(high))
    for _ in range(40):
        middle = (low + high) / 2
        if proportion(uniform(middle)) < target:
            low = middle
        else:
            high = middle
    error, ratio = min((abs(proportion(uniform(r)) - target), r) for r in (high, low) if r > 0)
    if error <= tolerance:
        return uniform(ratio), proportion(uniform(ratio))
    achieved = proportion(uniform(high))
    counts = {unit.name: unit.kept_count(high) for unit in units}
    while achieved > target + tolerance:
        smaller = [(counts[unit.name] / unit.num_channels, -index, unit) for index, unit in enumerate(units)
                   if counts[unit.name] > unit.allowed_counts()[0]]
        if not smaller:
            break
        _, _, unit = max(smaller, key=lambda item: item[:2])
        allowed = unit.allowed_counts()
        counts[unit.name] = allowed[allowed.index(counts[unit.name]) - 1]
        achieved = proportion({name: count / mutator.unit(name).num_channels for name, count in counts.items()})
    if abs(achieved - target) > tolerance:
        raise PruningError(f"no choices get within {tolerance} of the FLOPs target {target:.3f} (closest "
                           f"{achieved:.4f}); a smaller divisor/--block-size or another target helps")
    return {name: count / mutator.unit(name).num_channels for name, count in counts.items()}, achieved


def iterative_schedule(steps: int, prune_times: int | None = None, step_epoch: int | None = None,
                       importance: str = "l1") -> tuple[int, int]:
    """``(prune_times, step_epoch)`` of ``dagprune prune --method l1`` for a run of ``steps``.

    Defaults: ``prune_times`` is :data:`DEFAULT_PRUNE_TIMES`, lowered to what fits in ``steps``;
    ``step_epoch`` is ``steps // prune_times`` (at least 1), so the prunes are equally spaced.

    >>> iterative_schedule(100), iterative_schedule(100, prune_times=3), iterative_schedule(3)
    ((5, 20), (3, 33), (3, 1))
    >>> iterative_schedule(100, step_epoch=30)
    (4, 30)

    Raises:
        PruningError: a value below 1, a last prune at or after ``steps``, or "taylor" with
            fewer than 2 steps (its first prune waits for a training step).
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

    >>> parse_target_pruning_ratio("0.7"), parse_target_pruning_ratio({"conv_(0, 8)_8": 0.5})
    (0.7, {'conv_(0, 8)_8': 0.5})

    Raises:
        PruningError: a number out of (0, 1], a file that does not exist or is not a JSON
            object of unit names to numbers.
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


@dataclass
class IterativePlan:
    """What ``dagprune prune --method l1`` will do (see :func:`plan_iterative_pruning`)."""

    mutator: ChannelMutator
    target_pruning_ratio: dict
    """``{unit name: kept share}`` reached by the last prune."""
    predicted_flops_proportion: float
    prune_times: int
    step_epoch: int
    importance: str

    def describe(self, flops_target: float | None = None) -> str:
        """One line for the log: units, importance, kept shares, predicted FLOPs, schedule."""
        ratios = sorted(set(self.target_pruning_ratio.values()))
        kept = f"{ratios[0]:.4f}" if len(ratios) == 1 else f"{ratios[0]:.3f} to {ratios[-1]:.3f}"
        units = self.mutator.units
        importance = "" if self.importance == "l1" else f", importance {self.importance!r}"
        if flops_target is None:
            goal = (f"keeping {kept} of the channels of {len(self.target_pruning_ratio)} units "
                    f"(--target-pruning-ratio) gives FLOPs proportion {self.predicted_flops_proportion:.4f}")
        else:
            goal = (f"keeping {kept} of each unit's channels gives FLOPs proportion "
                    f"{self.predicted_flops_proportion:.4f} (target {flops_target:.2f})")
        return (f"{len(units)} units ({sum(unit.mutable for unit in units)} prunable){importance}; {goal}; "
                f"{self.prune_times} prunes every {self.step_epoch} steps")


def plan_iterative_pruning(dag: DagModule, input_shape: Sequence[int], args) -> IterativePlan:
    """The units, targets and schedule of ``dagprune prune --method l1`` on ``dag``.

    The targets are ``args.target_pruning_ratio`` (see :func:`parse_target_pruning_ratio`)
    when given, else the choices meeting the FLOPs target ``args.target``
    (:func:`choices_for_flops_target`). Kept counts are multiples of ``args.block_size``; the
    channels are ranked by ``args.importance`` (default "l1"). Where "taylor" has no gradients
    yet, FLOPs are predicted with the channels ranked by L1 norm (they differ only where a unit
    spans tensors of different cost).

    Raises:
        PruningError: a bad schedule, ratio or FLOPs target.
        ChannelUnitError: a unit name of the ratio file that the model does not have (the
            closest names are listed) or a ratio out of range.
    """
    importance = getattr(args, "importance", None) or "l1"
    prune_times, step_epoch = iterative_schedule(args.steps, getattr(args, "prune_times", None),
                                                 getattr(args, "step_epoch", None), importance)
    given_ratio = getattr(args, "target_pruning_ratio", None)
    ratio = parse_target_pruning_ratio(given_ratio)
    mutator = ChannelMutator({"type": "L1ChannelUnit",
                              "default_args": {"choice_mode": "ratio", "divisor": args.block_size,
                                               "importance": importance}},
                             {"type": "ChannelAnalysis", "input_shape": list(input_shape),
                              "head_pruning": getattr(args, "head_pruning", "dims")})
    mutator.prepare_from_supernet(dag)
    scores = None
    if importance == GRADIENT_IMPORTANCE:
        scores = {unit.name: channel_importance(mutator.analysis, mutator.group_of(unit.name), "l1")
                  for unit in mutator.mutable_units}
    if ratio is None:
        choices, predicted = choices_for_flops_target(mutator, args.target, scores=scores)
    else:
        choices = ratio if isinstance(ratio, dict) else {unit.name: ratio for unit in mutator.mutable_units}
        try:
            predicted = mutator.flops_proportion(choices, scores)  # checks every name and value
        except ChannelUnitError as error:
            source = given_ratio if isinstance(given_ratio, str) else "(a dict)"
            units_command = (f"dagprune units {getattr(args, 'model', 'MODEL')} --choice --input-size "
                             f"{' '.join(map(str, input_shape))}")
            raise ChannelUnitError(f"--target-pruning-ratio {source}: {error}; `{units_command}` prints this "
                                   "model's unit names") from error
    return IterativePlan(mutator, choices, predicted, prune_times, step_epoch, importance)


def run_iterative_l1(dag: DagModule, input_shape: Sequence[int], args, train, val, device, out,
                     progress=None):
    """``dagprune prune --method l1``: iterative pruning (ItePruneAlgorithm) to a FLOPs target or
    per-unit ratios, then export.

    The targets, importance and schedule come from :func:`plan_iterative_pruning`: by default
    one kept ratio for every unit (uniform, evened out on small units) so that the pruned model
    has ``args.target`` of the FLOPs (within 0.02); with ``args.target_pruning_ratio`` (a
    fraction or ``{unit name: fraction}``) those ratios instead. Kept counts are multiples of
    ``args.block_size``. The model is pruned ``args.prune_times`` times (default 5, at most
    what fits in ``args.steps``) every ``args.step_epoch`` steps (default ``steps //
    prune_times``), training the masked model with Adam in between (checkpointed into ``out``,
    so a stopped run resumes exactly), then the channels are removed. The masked model shares
    ``dag``'s weights, so ``dag`` is trained in place (as with the gated method).

    Returns:
        ``(pruned DAG, history, masked-model validation accuracy in percent, max relative
        difference between the removed and the masked model)``.
    """
    from dagprune import compare_module_outputs
    from dagprune_algorithms.training import StepResult, evaluate_accuracy, train_steps

    plan = plan_iterative_pruning(dag, input_shape, args)
    flops_target = None if getattr(args, "target_pruning_ratio", None) is not None else args.target
    LOG.info("l1: %s", plan.describe(flops_target))
    algorithm = ItePruneAlgorithm(dag, plan.mutator, target_pruning_ratio=plan.target_pruning_ratio,
                                  step_epoch=plan.step_epoch, prune_times=plan.prune_times).to(device)
    mutator = plan.mutator
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=args.lr)
    proportion_at: dict[int, float] = {}

    def current_proportion() -> float:
        done = int(algorithm.prunes_done)
        if done not in proportion_at:
            proportion_at[done] = mutator.flops_proportion()
        return proportion_at[done]

    def pruning_step(step, x, y):
        algorithm.maybe_prune(step)
        task_loss = F.cross_entropy(algorithm(x), y)
        return StepResult(task_loss, {"proportion": current_proportion(), "target": flops_target,
                                      "task_loss": task_loss.item(),
                                      "prunes_done": int(algorithm.prunes_done)})

    def validate(step, logs):
        if step % 100 and step != args.steps - 1:
            return {}
        return {"val_accuracy": evaluate_accuracy(algorithm, *val, device=device) / 100.0}

    history: list = []
    train_steps(algorithm, optimizer, train, args.batch_size, args.seed + 1, args.steps,
                step_fn=pruning_step, checkpoint_path=Path(out) / "l1_pruning.ckpt",
                checkpoint_every=args.checkpoint_every, device=device, progress=progress,
                history=history, on_log=validate)
    algorithm.eval()
    masked = algorithm.architecture
    accuracy = evaluate_accuracy(masked, *val, device=device)
    pruned = algorithm.remove_channels().to(device)
    difference = compare_module_outputs(masked, pruned, (4, *input_shape), raise_error=False, device=device)
    return pruned, history, accuracy, difference
