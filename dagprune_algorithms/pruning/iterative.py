"""Iterative pruning on a schedule (mmrazor's ``ItePruneAlgorithm``).

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

Two ways in: call :meth:`ItePruneAlgorithm.maybe_prune` in your own loop (below), or let
:func:`plan_iterative_pruning` choose the per-unit targets (e.g. for a FLOPs target) and
:func:`prune_iteratively` run the loop around your training step. ``dagprune prune --method l1``
(:mod:`dagprune_algorithms.app.iterative_job`) makes the same plan and calls ``maybe_prune``
from the app's checkpointed training loop.

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
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from dagprune import DagModule
from dagprune.errors import PruningError

from dagprune_algorithms.pruning.importance import TaylorScoreAccumulator, channel_importance
from dagprune_algorithms.pruning.mutator import ChannelMutator

__all__ = ["ItePruneAlgorithm", "choices_for_flops_target", "FLOPS_TARGET_TOLERANCE", "GRADIENT_IMPORTANCE",
           "IterativePlan", "plan_iterative_pruning", "prune_iteratively"]

GRADIENT_IMPORTANCE = "taylor"
"""The importance criterion ranked from gradients accumulated while training."""

FLOPS_TARGET_TOLERANCE = 0.02
"""Largest ``|achieved FLOPs proportion - target|`` accepted by :func:`choices_for_flops_target`."""

LOG = logging.getLogger(__name__)


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
        example_inputs: instead of a shape, the inputs the model takes (a tensor, a tuple of
            positional values or a dict of keyword values: token IDs, masks...).

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
                 prune_times: int = 1, input_shape: Sequence | None = None, example_inputs: Any = None):
        super().__init__()
        for name, value in (("step_epoch", step_epoch), ("prune_times", prune_times)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PruningError(f"{name} must be a positive int, got {value!r}")
        if target_pruning_ratio is None:
            raise PruningError("target_pruning_ratio is required: one choice for every unit (e.g. 0.7 "
                               "keeps 70% of each unit's channels) or {unit name: choice}; "
                               "`dagprune units MODEL --choice` prints the unit names")
        mutator = self._prepared_mutator(architecture, mutator_cfg, input_shape, example_inputs)
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
    def _prepared_mutator(architecture, mutator_cfg, input_shape, example_inputs) -> ChannelMutator:
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
        mutator.prepare_from_supernet(architecture, example_inputs)
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




@dataclass
class IterativePlan:
    """Per-unit targets and a schedule for :class:`ItePruneAlgorithm` (see :func:`plan_iterative_pruning`).

    Attributes:
        mutator: the :class:`ChannelMutator`, prepared on the model (``mutator.dag``).
        target_pruning_ratio: ``{unit name: kept share}`` reached by the last prune.
        predicted_flops_proportion: the pruned model's FLOPs as a fraction of the model's, with
            the channels ranked as when the plan was made.
        prune_times: prunes to reach the targets.
        step_epoch: steps between two prunes.
        importance: how the channels are ranked ("l1", "bn_scale", "taylor", ...).
    """

    mutator: ChannelMutator
    target_pruning_ratio: dict
    predicted_flops_proportion: float
    prune_times: int
    step_epoch: int
    importance: str

    def create_algorithm(self) -> ItePruneAlgorithm:
        """The :class:`ItePruneAlgorithm` that carries out this plan on ``mutator.dag``."""
        return ItePruneAlgorithm(self.mutator.dag, self.mutator, target_pruning_ratio=self.target_pruning_ratio,
                                 step_epoch=self.step_epoch, prune_times=self.prune_times)


def plan_iterative_pruning(dag: DagModule, input_shape: Sequence[int], *, prune_times: int, step_epoch: int,
                           target: float | None = None,
                           target_pruning_ratio: float | Mapping[str, float] | None = None,
                           block_size: int = 1, importance: str = "l1",
                           head_pruning: str = "dims", exclude: Sequence[str] = ()) -> IterativePlan:
    """Finds the channel units of ``dag`` and the kept share each one reaches.

    With ``target_pruning_ratio`` the shares are those (one for every unit, or ``{unit name:
    share}``, units not named are not pruned); otherwise they are the choices that leave
    ``target`` of the FLOPs (:func:`choices_for_flops_target`: one uniform share, evened out on
    small units). Where ``importance`` is "taylor", which has no gradients yet, FLOPs are
    predicted with the channels ranked by L1 norm (they differ only where a unit spans tensors
    of different cost).

    Args:
        dag: the model to prune.
        input_shape: its input shape without batch.
        prune_times, step_epoch: the schedule of :class:`ItePruneAlgorithm`.
        target: the FLOPs to keep, as a fraction of the model's (not with ``target_pruning_ratio``).
        target_pruning_ratio: the kept share of every unit, or ``{unit name: share}``.
        block_size: kept channel counts are multiples of it.
        importance: how the channels are ranked (a name of ``IMPORTANCE_CRITERIA``).
        head_pruning: "dims" or "heads" (see :class:`ChannelPruning`).
        exclude: module paths or fnmatch patterns whose units are left alone (see
            :mod:`.exclusion`).

    Returns:
        The plan; :meth:`IterativePlan.create_algorithm` turns it into an :class:`ItePruneAlgorithm`.

    Raises:
        PruningError: neither or both of ``target`` and ``target_pruning_ratio``; an unreachable
            FLOPs target.
        ChannelUnitError: a unit name the model does not have (the closest names are listed) or
            a share out of range.

    >>> import dagprune
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    >>> plan = plan_iterative_pruning(dagprune.build_from_unstructured_module(model), (3, 8, 8),
    ...                               prune_times=2, step_epoch=3, target_pruning_ratio=0.5)
    >>> plan.target_pruning_ratio, round(plan.predicted_flops_proportion, 3)
    ({'0_(0, 16)_16': 0.5}, 0.5)
    """
    if (target is None) == (target_pruning_ratio is None):
        raise PruningError("give one of target (the FLOPs to keep, e.g. 0.5) and target_pruning_ratio (the "
                           f"kept share of each unit's channels), got target={target!r}, "
                           f"target_pruning_ratio={target_pruning_ratio!r}")
    mutator = ChannelMutator({"type": "L1ChannelUnit",
                              "default_args": {"choice_mode": "ratio", "divisor": block_size,
                                               "importance": importance}},
                             {"type": "ChannelAnalysis", "input_shape": list(input_shape),
                              "head_pruning": head_pruning, "exclude": exclude})
    mutator.prepare_from_supernet(dag)
    scores = None
    if importance == GRADIENT_IMPORTANCE:
        scores = {unit.name: channel_importance(mutator.analysis, mutator.group_of(unit.name), "l1")
                  for unit in mutator.mutable_units}
    if target_pruning_ratio is None:
        choices, predicted = choices_for_flops_target(mutator, target, scores=scores)
    else:
        choices = (dict(target_pruning_ratio) if isinstance(target_pruning_ratio, Mapping)
                   else {unit.name: target_pruning_ratio for unit in mutator.mutable_units})
        predicted = mutator.flops_proportion(choices, scores)  # checks every name and value
    return IterativePlan(mutator, choices, predicted, prune_times, step_epoch, importance)


def prune_iteratively(algorithm: ItePruneAlgorithm, train_step: Callable[[nn.Module, int], None],
                      steps: int, start_step: int = 0) -> DagModule:
    """Runs the caller's training steps with the algorithm's prunes in between, then removes
    the channels.

    Step ``s`` (``start_step <= s < steps``) first applies the prune due at ``s``
    (:meth:`ItePruneAlgorithm.maybe_prune`), then calls ``train_step(model, s)``, where
    ``model`` is the masked model (:attr:`ItePruneAlgorithm.architecture`): the caller's
    forward pass, loss, backward pass and optimizer step. To resume a stopped run, load the
    algorithm's and the optimizer's state dicts and pass the step to continue from.

    Args:
        algorithm: the algorithm (e.g. from :meth:`IterativePlan.create_algorithm`).
        train_step: ``(model, step) -> None``, one training step of ``model``.
        steps: steps in all; every prune must fall before the last one.
        start_step: the first step to run.

    Returns:
        The slim model (:meth:`ItePruneAlgorithm.remove_channels`).

    Raises:
        PruningError: ``steps`` ends before the last prune.

    >>> import dagprune, torch
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    >>> plan = plan_iterative_pruning(dagprune.build_from_unstructured_module(model), (3, 8, 8),
    ...                               prune_times=2, step_epoch=2, target=0.5)
    >>> algorithm = plan.create_algorithm()
    >>> optimizer = torch.optim.SGD(algorithm.parameters(), lr=0.01)
    >>> def train_step(masked_model, step):
    ...     loss = masked_model(torch.randn(2, 3, 8, 8)).square().mean()
    ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
    >>> slim = prune_iteratively(algorithm, train_step, steps=4)
    >>> slim.vertex("_0").module.out_channels
    8
    """
    last_prune = (algorithm.prune_times - 1) * algorithm.step_epoch
    if algorithm.taylor_scores is not None:
        last_prune = max(last_prune, 1)  # a prune due at step 0 waits for step 1
    if not algorithm.done and steps <= last_prune:
        raise PruningError(f"steps={steps} ends before the last prune (step {last_prune}); raise steps, or lower "
                           "prune_times or step_epoch")
    for step in range(start_step, steps):
        algorithm.maybe_prune(step)
        train_step(algorithm.architecture, step)
    return algorithm.remove_channels()
