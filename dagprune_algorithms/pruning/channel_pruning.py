"""ChannelPruning: the user-facing API of differentiable, FLOPs- (or parameter-, latency-) constrained
channel pruning."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from dagprune import DagModule
from dagprune.errors import PruningError
from dagprune.example_inputs import as_example_inputs
from dagprune.shape_prop import module_device

from dagprune_algorithms.pruning.argument_checks import (check_channel_limits, check_finite_numbers, check_global_step,
                                                         check_latency_table)
from dagprune_algorithms.pruning.calibration import calibrated_logits
from dagprune_algorithms.pruning.budgets import BudgetCost, ExpectedCost, check_budget, flops_cost, params_cost
from dagprune_algorithms.pruning.channel_groups import (ChannelAnalysis, ChannelGroup, check_head_pruning,
                                                        find_channel_groups)
from dagprune_algorithms.pruning.channel_removal import remove_channels_from_dag
from dagprune_algorithms.pruning.exclusion import check_exclude_patterns, exclude_modules
from dagprune_algorithms.pruning.importance import channel_importance
from dagprune_algorithms.pruning.gated_model import build_gated_dag
from dagprune_algorithms.pruning.gates import ChannelGate, GateSet, MaskApply, MaskedConsumer
from dagprune_algorithms.pruning.latency_table import LatencyTable, measure_latency_table
from dagprune_algorithms.pruning.width_table import WidthTable, measure_width_table
from dagprune_algorithms.pruning.losses import (NonFiniteLossWatch, PruningLossConfig, anneal, binary_entropy,
                                                failures_shared_by_processes, non_finite_local_tensors,
                                                removed_energy_share, scheduled_target)

__all__ = ["ChannelPruning", "check_flops_target"]

FINITE_CHECK_INTERVAL = 100
"""Default number of training steps between two reads of the non-finite checks."""

TARGET_TOLERANCE = 0.02
"""Default largest excess of the reached FLOPs share over the target (an absolute share)."""


def _analysed_inputs(model: DagModule, input_shape_without_batch, example_inputs):
    """``(shape, None)`` or ``(None, ExampleInputs)``: what the channel analysis runs on."""
    if example_inputs is not None:
        return None, as_example_inputs(example_inputs)
    if input_shape_without_batch is None:
        raise PruningError(f"{model.name}: give input_shape_without_batch (float inputs) or "
                           "example_inputs= (the tensors the model takes: token IDs, masks...)")
    return tuple(input_shape_without_batch), None


class ChannelPruning:
    """Finds channel groups, gates them, and removes the closed channels after training.

    Args:
        model: the DAG to prune (see :func:`dagprune.build_from_unstructured_module`).
        input_shape_without_batch: e.g. ``(3, 224, 224)``; FLOPs are counted for it (batch 1,
            random float inputs). None when ``example_inputs`` are given.
        pruning_proportion: the target cost as a fraction of the original, in (0, 1): FLOPs,
            or what ``budget`` names.
        num_training_steps: length of the pruning schedule (used by the losses).
        block_size: kept channel counts are multiples of this in every group (a group of at
            most ``block_size`` channels is kept whole).
        initial_logit: starting gate logit (3.0 keeps channels open with probability 0.95).
        temperature: temperature of the relaxed masks sampled in train mode.
        loss_config: weights and schedule of the pruning losses.
        initial_importance: criterion (see :mod:`.importance`) ranking the channels of each
            group at the start: logits start at ``initial_logit +- initial_logit_spread`` by
            rank, so the least important channels close first. None: all start equal.
        initial_logit_spread: half-width of that starting range.
        head_pruning: ``"dims"`` (default) removes the same head dimensions from every
            attention head; ``"heads"`` removes whole heads (see
            :data:`~.channel_groups.HEAD_PRUNING_MODES`).
        example_inputs: instead of a shape, the inputs the model takes: a tensor, a tuple of
            positional values or a dict of keyword values, of any dtype (token IDs, masks).
        finite_check_interval: training steps between two reads of the non-finite checks
            (see :meth:`compute_current_proportion_and_pruning_losses`).
        exclude: module paths of the model (``"head.fc"``) or fnmatch patterns over them
            (``"stem*"``) to leave alone: every channel group such a module touches keeps all
            its channels and gets no gate (see :mod:`.exclusion`).
        min_channels: fewest channels every group keeps.
        round_to: kept channel counts are multiples of this in groups of at least
            ``round_to`` channels (smaller groups are not rounded); not with ``block_size``.
            ``"auto"``: the multiple the device runs fast, chosen at :meth:`prepare_for_pruning`
            from ``width_table`` or one measured on the model's device and dtype (cached; see
            :mod:`.width_table`); :attr:`round_to` then holds the chosen int, and a group
            narrower than twice it rounds to a finer power of two, so that it keeps a choice.
        width_table: the :class:`~.width_table.WidthTable` of ``round_to="auto"``.
        budget: what ``pruning_proportion``, the FLOPs loss and the proportions count (see
            :mod:`.budgets`): ``"flops"``; ``"params"``, the slim model's parameter count
            (exact where :attr:`cost` lists no ``approximate`` vertex); ``"latency"``, the
            latency a :class:`~.latency_table.LatencyTable` measured on the device predicts
            (an approximation: see :mod:`.latency_table`).
        latency_table: the table of ``budget="latency"``; None measures one at
            :meth:`prepare_for_pruning` (batch 1 of the analysed inputs, on the model's
            device, cached in :func:`~.latency_table.default_cache_dir`). Build it with
            :func:`~.latency_table.measure_latency_table` to choose the batch, device or cache.
        distributed_checks: under ``torch.distributed`` (DDP, FSDP), a NaN or Inf that one
            process finds (in its own ``bkd_loss``, or its shard of a sharded model) stops every
            process at that check, not that one alone; every process must then reach the checks
            together (as a training loop does; see :meth:`check_finite`).

    Raises:
        PruningError: an argument is out of range or not finite; ``exclude`` is not a list of
            strings (a pattern that matches no module is reported by :meth:`prepare_for_pruning`).

    Any dtype works: a float16, bfloat16 or float64 model keeps its dtype; the gate logits
    and the losses are float32, the masks are cast to the dtype of the activations they scale.

    >>> import dagprune
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
    ...                       nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    >>> cfg = ChannelPruning(dagprune.build_from_unstructured_module(model), (3, 8, 8), 0.5, 100)
    >>> gated = cfg.prepare_for_pruning()
    >>> round(cfg.prunable_proportion, 3), len(cfg.prunable_groups)
    (1.0, 2)
    >>> cfg = ChannelPruning(dagprune.build_from_unstructured_module(model), (3, 8, 8), 0.5, 100,
    ...                      exclude=["5"], min_channels=2)  # leave the linear head alone
    >>> gated = cfg.prepare_for_pruning()
    >>> [group.name for group in cfg.prunable_groups], round(cfg.prunable_proportion, 3)
    (['0'], 0.985)
    >>> cfg = ChannelPruning(dagprune.build_from_unstructured_module(model), (3, 8, 8), 0.5, 100,
    ...                      budget="params")  # the target is half the parameters
    >>> gated = cfg.prepare_for_pruning()
    >>> round(cfg.max_removable_proportion, 3), cfg.cost.approximate
    (0.932, [])
    """

    def __init__(self, model: DagModule, input_shape_without_batch: Sequence[int] | None,
                 pruning_proportion: float, num_training_steps: int, block_size: int = 1,
                 initial_logit: float = 3.0, temperature: float = 0.5,
                 loss_config: PruningLossConfig | None = None, initial_importance: str | None = "l1",
                 initial_logit_spread: float = 1.0, head_pruning: str = "dims",
                 finite_check_interval: int = FINITE_CHECK_INTERVAL, example_inputs: Any = None,
                 exclude: Sequence[str] | None = None, min_channels: int = 1, round_to: int | str = 1,
                 budget: str = "flops", latency_table: LatencyTable | None = None,
                 distributed_checks: bool = False, width_table: WidthTable | None = None):
        if not isinstance(model, DagModule):
            raise PruningError(f"ChannelPruning needs a DagModule, got {type(model).__name__}; "
                               "convert it first with dagprune.build_from_unstructured_module(model)")
        if not (isinstance(pruning_proportion, (int, float)) and 0 < pruning_proportion < 1):
            raise PruningError(f"pruning_proportion must be in (0, 1) (the target share of the "
                               f"original FLOPs, parameters or latency), got {pruning_proportion!r}")
        if not isinstance(num_training_steps, int) or num_training_steps < 1:
            raise PruningError(f"num_training_steps must be a positive int, got {num_training_steps!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise PruningError(f"block_size must be a positive int, got {block_size!r}")
        if not isinstance(finite_check_interval, int) or finite_check_interval < 1:
            raise PruningError(f"finite_check_interval must be a positive int, got {finite_check_interval!r}")
        check_channel_limits(block_size, min_channels, round_to, width_table)
        check_finite_numbers(initial_logit=initial_logit, temperature=temperature,
                              initial_logit_spread=initial_logit_spread)
        if temperature <= 0:
            raise PruningError(f"temperature must be > 0, got {temperature!r}")
        check_head_pruning(head_pruning)
        check_latency_table(check_budget(budget), latency_table)
        self.model = model
        self.input_shape_without_batch, self.example_inputs = _analysed_inputs(
            model, input_shape_without_batch, example_inputs)
        self.pruning_proportion = float(pruning_proportion)
        self.num_training_steps = num_training_steps
        self.block_size = block_size
        self.initial_logit = initial_logit
        self.temperature = temperature
        self.loss_config = loss_config or PruningLossConfig()
        self.initial_importance = initial_importance
        self.initial_logit_spread = initial_logit_spread
        self.head_pruning = head_pruning
        self.finite_check_interval = finite_check_interval
        self.distributed_checks = distributed_checks
        self.exclude = check_exclude_patterns(exclude)
        self.min_channels = min_channels
        self.round_to = round_to
        self.width_table = width_table
        self.budget = budget
        self.latency_table = latency_table
        self.cost: BudgetCost | None = None
        self._loss_watch = NonFiniteLossWatch()
        self.analysis: ChannelAnalysis | None = None
        self.pruning_model: DagModule | None = None
        self.gates: list[ChannelGate] = []

    # ------------------------------------------------------------------------------ preparing
    def prepare_for_pruning(self) -> DagModule:
        """Finds the channel groups and returns the gated model (sharing the model's weights).

        Calling it again returns the same gated model, with the same gates: an optimizer
        built on :meth:`gate_parameters` keeps training the gates the model uses. To start
        over with other settings, create a new :class:`ChannelPruning`.

        Returns:
            The gated DAG, on the model's device; the model keeps its dtype, the gates are float32.

        Raises:
            PruningError: the model's weights or normalisation statistics hold NaN or Inf (the
                message names the vertices), an ``exclude`` pattern matches no module, the
                model has no prunable group, or the target is below what removing every
                prunable channel could reach.
        """
        if self.pruning_model is not None:
            return self.pruning_model
        self._check_model_finite("prepare_for_pruning()")
        device = module_device(self.model)
        self._resolve_round_to(device)
        self.analysis = find_channel_groups(self.model, self.input_shape_without_batch,
                                            self.head_pruning, self.example_inputs)
        exclude_modules(self.analysis, self.exclude)
        self._leave_groups_without_choice()
        if not self.prunable_groups:
            blocked = [f"{g.name}: {g.reason}" for g in self.analysis.groups][:5]
            raise PruningError(
                f"{self.model.name} has no prunable channel group (found {len(self.analysis.groups)} "
                f"groups, none prunable: {blocked}); every channel reaches the model's boundary or "
                "an op whose channels are not followed (find_channel_groups(...) lists each group's "
                "reason; describe a missing op with dagprune.ops.register_op(OpSpec(...)))")
        self.cost = self._budget_cost()
        reachable = 1.0 - self.max_removable_proportion
        if self.pruning_proportion < reachable - 1e-9:
            raise PruningError(
                f"pruning_proportion {self.pruning_proportion:.3f} cannot be reached: removing every "
                f"prunable channel leaves {reachable:.3f} of the {self.cost.noun} (max_removable_proportion "
                f"{self.max_removable_proportion:.3f}); choose a target >= {reachable:.3f}")
        self.gates = [ChannelGate(group.size, self.initial_logit, self.temperature,
                                  self._group_block_size(group.size), self._minimum_kept(group.size))
                      for group in self.prunable_groups]
        if self.initial_importance is not None:
            for group, gate in zip(self.prunable_groups, self.gates):
                ranks = channel_importance(self.analysis, group, self.initial_importance).argsort().argsort()
                spread = (torch.as_tensor(ranks, dtype=torch.float32) / max(group.size - 1, 1) - 0.5) * 2
                with torch.no_grad():
                    gate.logits += self.initial_logit_spread * spread
        self._check_gates_finite("prepare_for_pruning()")
        self.pruning_model = build_gated_dag(self.analysis, self.gates)
        if device.type != "cpu":  # the gates and masks are built on the CPU, where the model already is
            self.pruning_model.to(device)
        self._expected_flops = ExpectedCost(self.cost, self.prunable_groups)
        self._gate_set = GateSet(self.gates, joint_sampling=True)
        self.pruning_model.register_forward_pre_hook(self._gate_set.new_draw)
        self._mask_modules = [module for module in self.pruning_model.modules()
                              if isinstance(module, MaskApply) or (
                                  isinstance(module, MaskedConsumer) and module.records_energy)]
        return self.pruning_model

    def _budget_cost(self) -> BudgetCost:
        """The cost :attr:`budget` counts, for the prepared analysis."""
        if self.budget == "flops":
            return flops_cost(self.analysis)
        if self.budget == "params":
            return params_cost(self.analysis)
        if self.latency_table is None:
            self.latency_table = measure_latency_table(
                self.model, self.input_shape_without_batch, example_inputs=self.example_inputs,
                device=module_device(self.model), head_pruning=self.head_pruning)
        return self.latency_table.cost(self.analysis)

    def _resolve_round_to(self, device: torch.device) -> None:
        """``round_to="auto"``: the best multiple of the width table, measured if none was given."""
        if self.round_to != "auto":
            return
        if self.width_table is None:
            dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
            self.width_table = measure_width_table(device, dtype)
        self.round_to = self.width_table.best_multiple()

    def _rounding_multiple(self, size: int) -> int:
        """The multiple a group of ``size`` channels rounds its kept count to: ``round_to`` in
        groups at least that wide, 1 in narrower ones. Under ``round_to="auto"`` a group keeps
        at least two blocks to choose from: a group narrower than twice the measured multiple
        rounds to a finer power of two (16 channels under 16 round to 8) instead of losing its
        gate to a single block."""
        if self.round_to <= 1 or size < self.round_to:
            return 1
        multiple = self.round_to
        if self.width_table is not None:  # round_to="auto"
            while multiple > 1 and size < 2 * multiple:
                multiple //= 2
        return multiple

    def _group_block_size(self, size: int) -> int:
        """Kept counts of a group of ``size`` channels are multiples of this."""
        if self.round_to > 1:
            return self._rounding_multiple(size)
        return self.block_size

    def _minimum_kept(self, size: int) -> int:
        """Fewest channels a group of ``size`` keeps under ``min_channels`` and ``round_to``
        (``block_size`` is left out, as before it existed: its groups keep one block)."""
        block = self._rounding_multiple(size)
        return min(-(-min(self.min_channels, size) // block) * block, size)

    def _leave_groups_without_choice(self) -> None:
        """Marks the groups that ``min_channels`` and ``round_to`` let keep nothing but every
        channel as not prunable (they would get a gate that can never close)."""
        for group in self.analysis.prunable_groups:
            if self._minimum_kept(group.size) >= group.size:
                group.prunable = False
                group.reason = (f"min_channels={self.min_channels}, round_to={self.round_to} keep all "
                                f"{group.size} channels")

    def _require_prepared(self) -> ChannelAnalysis:
        if self.analysis is None:
            raise PruningError("call prepare_for_pruning() first")
        return self.analysis

    @property
    def channel_groups(self) -> list[ChannelGroup]:
        """All channel groups found (prunable or not)."""
        return self._require_prepared().groups

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return self._require_prepared().prunable_groups

    def _require_cost(self) -> BudgetCost:
        self._require_prepared()
        if self.cost is None:
            raise PruningError("call prepare_for_pruning() first")
        return self.cost

    @property
    def prunable_proportion(self) -> float:
        """Share of the budget's cost (FLOPs by default) in ops that a gate touches on their
        input or output side."""
        return self._require_cost().touched_share(self.analysis.gated_class_mask())

    @property
    def max_removable_proportion(self) -> float:
        """Share of the budget's cost that vanishes when every prunable group keeps its fewest
        channels (one, or what ``min_channels`` and ``round_to`` ask)."""
        cost = self._require_cost()
        keep = np.ones(len(self.analysis.atom_class), dtype=bool)
        for group in self.analysis.prunable_groups:
            keep[group.classes[self._minimum_kept(group.size):]] = False
        return 1.0 - cost.share(keep)

    # ------------------------------------------------------------------------------ training
    def gate_parameters(self) -> list[nn.Parameter]:
        """The gate logits (one tensor per prunable group), e.g. for their own optimizer group."""
        return [gate.logits for gate in self.gates]

    def weight_parameters(self) -> list[nn.Parameter]:
        """The model's parameters other than the gate logits."""
        gate_ids = {id(p) for p in self.gate_parameters()}
        return [p for p in self._require_gated().parameters() if id(p) not in gate_ids]

    def _require_gated(self) -> DagModule:
        if self.pruning_model is None:
            raise PruningError("call prepare_for_pruning() first")
        return self.pruning_model

    def expected_proportion(self) -> torch.Tensor:
        """Expected share of the budget's cost under the keep probabilities ``sigmoid(logits)``
        (differentiable)."""
        self._require_gated()
        return self._expected_flops.proportion(self._gate_set.keep_probabilities())

    def compute_current_proportion_and_pruning_losses(self, global_step: int):
        """The pruning losses to add to the task loss at ``global_step``.

        Non-finite values are caught without a host synchronisation per step: every step
        records on the device whether a loss was NaN or Inf (:class:`.losses.NonFiniteLossWatch`,
        a few tiny tensor ops); on steps divisible by ``finite_check_interval`` (step 0
        included) and on the last step of the schedule, :meth:`check_finite` reads that record
        together with the gates, weights and statistics, waiting for the device a few times. A device-side
        assertion (``torch._assert_async``) would need no such read, but on a GPU it aborts
        the process's CUDA context with a message naming no vertex, so it is not used. Call
        :meth:`check_finite` yourself when you log, to stop sooner.

        Args:
            global_step: index of the training step, a Python int >= 0.

        Returns:
            ``(proportion, flops_loss, entropy_loss, bkd_loss)``: the expected budget share and
            the three losses (scalar tensors; see :mod:`dagprune_algorithms.pruning.losses`).
            ``bkd_loss`` uses the activations of the latest train-mode forward pass of the
            gated model, so call this after the forward pass. Under ``torch.autocast`` the
            losses are still computed in float32.

        Raises:
            PruningError: ``global_step`` is not an int >= 0; on a checked step, a loss since the
                previous check, a gate logit, a weight or a statistic is NaN or Inf (the
                message names the step, the group or the vertex).
        """
        check_global_step(global_step)
        device_type = module_device(self._require_gated()).type
        with torch.autocast(device_type=device_type, enabled=False):  # losses in float32
            return self._losses_at(global_step)

    def _losses_at(self, global_step: int):
        """The body of :meth:`compute_current_proportion_and_pruning_losses`."""
        model = self._require_gated()
        config = self.loss_config
        last_step = self.num_training_steps - 1
        frozen = config.freeze_fraction > 0 and global_step >= min(
            (1.0 - config.freeze_fraction) * self.num_training_steps, last_step)
        if frozen and not self.gates[0].frozen:
            self.calibrate_to_target()
        for gate in self.gates:
            gate.freeze(frozen)
        gate_set = self._gate_set
        probabilities = gate_set.keep_probabilities()
        proportion = self._expected_flops.proportion(probabilities)
        hard_proportion = self._expected_flops.proportion(gate_set.hard_masks())
        strength = anneal(global_step, self.num_training_steps)
        target = scheduled_target(global_step, self.num_training_steps, self.pruning_proportion,
                                  config.target_warmup)
        # The loss sees the hard model's FLOPs (what removal will give) with the gradient of
        # the expected FLOPs (straight-through), so it stops only when the hard model is there.
        ratio = (hard_proportion + proportion - proportion.detach()) / target
        flops_loss = config.flops_weight * strength * (
            torch.relu(ratio - 1) + config.below_target_weight * torch.relu(1 - ratio))
        entropies = gate_set.group_means(binary_entropy(probabilities))
        entropy_loss = config.entropy_weight * strength * entropies.clamp_min(config.entropy_floor).mean()
        removed = removed_energy_share(self._mask_modules) if model.training else None
        bkd_loss = config.bkd_weight * removed if removed is not None else proportion.new_zeros(())
        self._loss_watch.record(global_step, proportion, flops_loss, entropy_loss, bkd_loss)
        if global_step % self.finite_check_interval == 0 or global_step == last_step:
            self._check_all_finite(f"pruning losses at step {global_step}")
        return proportion, flops_loss, entropy_loss, bkd_loss

    # ------------------------------------------------------------------------------ non-finite
    def check_finite(self) -> None:
        """Raises when the gates, the model's weights and statistics, or the losses of any step
        so far are NaN or Inf. Reads a few flags from the device (one wait each), so call it
        where the loop synchronises anyway, e.g. when logging. With ``distributed_checks`` it is a
        collective, as are :meth:`remove_channels` and the checked steps of the losses.

        Raises:
            PruningError: naming the channel groups whose gate logits, or the vertices whose
                parameters or buffers, are not finite, or else the first step whose losses
                were not finite; with what to do next.
        """
        self._check_all_finite("check_finite()")

    def _check_all_finite(self, during: str) -> None:
        self._require_gated()
        with failures_shared_by_processes(self.distributed_checks, during):
            self._check_gates_finite(during)
            self._check_model_finite(during)
            self._loss_watch.check(during)

    def _check_gates_finite(self, during: str) -> None:
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(gate.logits).all() for gate in self.gates]).tolist()
        bad = [f"{group.name!r} ({int((~torch.isfinite(gate.logits)).sum())} of {gate.logits.numel()})"
               for group, gate, ok in zip(self.prunable_groups, self.gates, finite) if not ok]
        if bad:
            raise PruningError(
                f"{during}: the gate logits of channel group(s) {', '.join(bad[:5])} are NaN or "
                f"Inf{' (and more)' if len(bad) > 5 else ''}; a diverged loss or too high a gate "
                "learning rate makes them so: lower the gate learning rate or clip the gradients, "
                "and restart from the last good checkpoint")

    def _check_model_finite(self, during: str) -> None:
        bad = non_finite_local_tensors(self.model)
        if bad:
            raise PruningError(
                f"{during}: {self.model.name} holds NaN or Inf in {len(bad)} weight or statistic "
                f"tensor(s): {'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; pruning would "
                "give a meaningless model: load a good checkpoint (or re-initialise these "
                "tensors) and prepare again")

    def calibrate_to_target(self, target: float | None = None) -> float:
        """Flips the least certain gate decisions so the hard model lands nearest the target
        (``target``, a share of the budget's cost; default :attr:`pruning_proportion`).

        Channels are ordered by how close their logit is to the decision boundary; the
        shortest prefix of flips (closing open channels when above the target, opening closed
        ones when below) that brings the hard FLOPs share closest to ``pruning_proportion`` is
        applied by moving those logits just across zero. Every group keeps a channel, and the
        shares compared are those of the kept counts after rounding to ``block_size`` or
        ``round_to``; with such blocks, whole blocks are then opened or closed where that lands
        nearer the target (see :mod:`.calibration`).

        Returns:
            The hard FLOPs share after calibration.

        Raises:
            PruningError: a gate's logits are NaN or Inf (the message names its group).
        """
        self._require_gated()
        self._check_gates_finite("calibrate_to_target()")
        target = self.pruning_proportion if target is None else float(target)
        share_of = lambda keep: self._expected_flops.proportion(keep).item()  # noqa: E731
        calibrated = calibrated_logits(self.gates, self._gate_set, share_of, target)
        with torch.no_grad():
            for gate, gate_logits in zip(self.gates, calibrated):
                gate.logits.copy_(gate_logits.to(gate.logits.device))  # bumps the version: masks follow
        return self.current_hard_proportion()

    # ------------------------------------------------------------------------------ state
    def kept_classes(self) -> np.ndarray:
        """Boolean array over channel classes: True where the eval-mode gates keep the class."""
        analysis = self._require_prepared()
        keep = np.ones(len(analysis.atom_class), dtype=bool)
        for group, gate in zip(analysis.prunable_groups, self.gates):
            keep[group.classes] = gate.hard_mask().cpu().numpy() > 0.5
        return keep

    def current_hard_proportion(self) -> float:
        """The budget's cost (FLOPs by default) of the eval-mode (hard-mask) model over the original's."""
        return self._require_cost().share(self.kept_classes())

    def remove_channels(self) -> DagModule:
        """A plain, slim DAG computing what the gated model computes in eval mode.

        Returns:
            The slim DAG, on the model's device and in the model's dtype.

        Raises:
            PruningError: a gate's logits, a weight, a statistic or a pruning loss since the
                last check is NaN or Inf (see :meth:`check_finite`).
        """
        analysis = self._require_prepared()
        self._check_all_finite("remove_channels()")
        slim = remove_channels_from_dag(analysis, self.kept_classes())
        slim.train(self._require_gated().training)
        return slim.to(module_device(self.model))

    def check_target_reached(self, tolerance: float = TARGET_TOLERANCE,
                             proportion: float | None = None) -> float:
        """Checks that the pruned model's budget share is at most the target plus ``tolerance``.

        Args:
            tolerance: the largest allowed excess, as a share of the original FLOPs.
            proportion: the reached share, e.g. measured on the slim model; default:
                :meth:`current_hard_proportion` (what :meth:`remove_channels` gives).

        Returns:
            The miss, ``proportion - pruning_proportion`` (<= 0 when at or below the target).

        Raises:
            PruningError: the share exceeds the target by more than ``tolerance``.
        """
        reached = self.current_hard_proportion() if proportion is None else proportion
        return check_flops_target(reached, self.pruning_proportion, tolerance, self._require_cost().noun)


def check_flops_target(proportion: float, target: float, tolerance: float = TARGET_TOLERANCE,
                       cost_name: str = "FLOPs") -> float:
    """Checks that a reached FLOPs share is at most ``target + tolerance``.

    Below the target counts as reached: the target is a budget.

    Args:
        proportion: the reached FLOPs share (pruned FLOPs / original FLOPs).
        target: the requested share, e.g. ``pruning_proportion``.
        tolerance: the largest allowed excess, as a share of the original FLOPs.
        cost_name: what the share counts, for the message (``"parameters"``, ``"latency"``).

    Returns:
        The miss, ``proportion - target``.

    Raises:
        PruningError: ``proportion`` exceeds ``target`` by more than ``tolerance``, or is not finite.

    >>> round(check_flops_target(0.51, 0.5), 3)
    0.01
    >>> check_flops_target(1.0, 0.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dagprune.errors.PruningError: FLOPs target missed: ... target 0.5000, 0.5000 above it (tolerance 0.0200); ...
    """
    check_finite_numbers(proportion=proportion, target=target, tolerance=tolerance)
    miss = proportion - target
    if miss > tolerance:
        raise PruningError(
            f"{cost_name} target missed: the pruned model keeps {proportion:.4f} of the original {cost_name}, "
            f"target {target:.4f}, {miss:.4f} above it (tolerance {tolerance:.4f}); train for more "
            "steps, raise the FLOPs loss weight or the gate learning rate")
    return miss
