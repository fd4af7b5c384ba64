"""ChannelPruning: the user-facing API of differentiable, FLOPs-constrained channel pruning."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from dagprune import DagModule, InnerVertex
from dagprune.errors import PruningError
from dagprune.ops import spec_for

from dagprune_algorithms.pruning.channel_groups import (ChannelAnalysis, ChannelGroup, check_head_pruning,
                                                        find_channel_groups)
from dagprune_algorithms.pruning.channel_removal import remove_channels_from_dag
from dagprune_algorithms.pruning.importance import channel_importance
from dagprune_algorithms.pruning.gates import ChannelGate, GateSet, MaskApply, MaskedConsumer
from dagprune_algorithms.pruning.losses import (ExpectedFlops, PruningLossConfig, anneal,
                                                binary_entropy, removed_energy_share, scheduled_target)

__all__ = ["ChannelPruning"]


class ChannelPruning:
    """Finds channel groups, gates them, and removes the closed channels after training.

    Args:
        model: the DAG to prune (see :func:`dagprune.build_from_unstructured_module`).
        input_shape_without_batch: e.g. ``(3, 224, 224)``; FLOPs are counted for it.
        pruning_proportion: the target FLOPs as a fraction of the original, in (0, 1).
        num_training_steps: length of the pruning schedule (used by the losses).
        block_size: kept channel counts are multiples of this (hardware-friendly).
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

    >>> import dagprune
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
    ...                       nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    >>> cfg = ChannelPruning(dagprune.build_from_unstructured_module(model), (3, 8, 8), 0.5, 100)
    >>> gated = cfg.prepare_for_pruning()
    >>> round(cfg.prunable_proportion, 3), len(cfg.prunable_groups)
    (1.0, 2)
    """

    def __init__(self, model: DagModule, input_shape_without_batch: Sequence[int],
                 pruning_proportion: float, num_training_steps: int, block_size: int = 1,
                 initial_logit: float = 3.0, temperature: float = 0.5,
                 loss_config: PruningLossConfig | None = None, initial_importance: str | None = "l1",
                 initial_logit_spread: float = 1.0, head_pruning: str = "dims"):
        if not isinstance(model, DagModule):
            raise PruningError(f"ChannelPruning needs a DagModule, got {type(model).__name__}; "
                               "convert it first with dagprune.build_from_unstructured_module(model)")
        if not (isinstance(pruning_proportion, (int, float)) and 0 < pruning_proportion < 1):
            raise PruningError(f"pruning_proportion must be in (0, 1) (the target share of the "
                               f"original FLOPs), got {pruning_proportion!r}")
        if not isinstance(num_training_steps, int) or num_training_steps < 1:
            raise PruningError(f"num_training_steps must be a positive int, got {num_training_steps!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise PruningError(f"block_size must be a positive int, got {block_size!r}")
        check_head_pruning(head_pruning)
        self.model = model
        self.input_shape_without_batch = tuple(input_shape_without_batch)
        self.pruning_proportion = float(pruning_proportion)
        self.num_training_steps = num_training_steps
        self.block_size = block_size
        self.initial_logit = initial_logit
        self.temperature = temperature
        self.loss_config = loss_config or PruningLossConfig()
        self.initial_importance = initial_importance
        self.initial_logit_spread = initial_logit_spread
        self.head_pruning = head_pruning
        self.analysis: ChannelAnalysis | None = None
        self.pruning_model: DagModule | None = None
        self.gates: list[ChannelGate] = []

    # ------------------------------------------------------------------------------ preparing
    def prepare_for_pruning(self) -> DagModule:
        """Finds the channel groups and returns the gated model (sharing the model's weights).

        Raises:
            PruningError: the model has no prunable group, or the target is below what
                removing every prunable channel could reach.
        """
        device = next(iter(self.model.parameters()), torch.zeros(0)).device
        self.analysis = find_channel_groups(self.model, self.input_shape_without_batch,
                                            self.head_pruning)
        if not self.prunable_groups:
            blocked = [f"{g.name}: {g.reason}" for g in self.analysis.groups][:5]
            raise PruningError(
                f"{self.model.name} has no prunable channel group (found {len(self.analysis.groups)} "
                f"groups, none prunable: {blocked}); every channel reaches the model's boundary or "
                "an op whose channels are not followed (find_channel_groups(...) lists each group's "
                "reason; describe a missing op with dagprune.ops.register_op(OpSpec(...)))")
        reachable = 1.0 - self.max_removable_proportion
        if self.pruning_proportion < reachable - 1e-9:
            raise PruningError(
                f"pruning_proportion {self.pruning_proportion:.3f} cannot be reached: removing every "
                f"prunable channel leaves {reachable:.3f} of the FLOPs (max_removable_proportion "
                f"{self.max_removable_proportion:.3f}); choose a target >= {reachable:.3f}")
        self.gates = [ChannelGate(group.size, self.initial_logit, self.temperature, self.block_size)
                      for group in self.prunable_groups]
        if self.initial_importance is not None:
            for group, gate in zip(self.prunable_groups, self.gates):
                ranks = channel_importance(self.analysis, group, self.initial_importance).argsort().argsort()
                spread = (torch.as_tensor(ranks, dtype=torch.float32) / max(group.size - 1, 1) - 0.5) * 2
                gate.logits.data += self.initial_logit_spread * spread
        self.pruning_model = _build_gated_dag(self.analysis, self.gates).to(device)
        self._expected_flops = ExpectedFlops(self.analysis)
        self._gate_set = GateSet(self.gates)
        self._mask_modules = [module for module in self.pruning_model.modules()
                              if isinstance(module, MaskApply) or (
                                  isinstance(module, MaskedConsumer) and module.records_energy)]
        return self.pruning_model

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

    @property
    def prunable_proportion(self) -> float:
        """Share of FLOPs in ops that a gate touches on their input or output side."""
        analysis = self._require_prepared()
        gated = analysis.gated_class_mask()
        touched = sum(term.base_flops for term in analysis.flops_terms
                      if any(gated[f].any() for f in term.factors))
        return touched / analysis.total_flops if analysis.total_flops else 0.0

    @property
    def max_removable_proportion(self) -> float:
        """Share of FLOPs that vanishes when every prunable group keeps one channel."""
        analysis = self._require_prepared()
        keep = np.ones(len(analysis.atom_class), dtype=bool)
        for group in analysis.prunable_groups:
            keep[group.classes[1:]] = False
        return 1.0 - analysis.predicted_flops(keep) / analysis.total_flops

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
        """Expected FLOPs share under the keep probabilities ``sigmoid(logits)`` (differentiable)."""
        self._require_gated()
        return self._expected_flops.proportion(self._gate_set.keep_probabilities())

    def compute_current_proportion_and_pruning_losses(self, global_step: int):
        """The pruning losses to add to the task loss at ``global_step``.

        Returns:
            ``(proportion, flops_loss, entropy_loss, bkd_loss)``: the expected FLOPs share and
            the three losses (scalar tensors; see :mod:`dagprune_algorithms.pruning.losses`).
            ``bkd_loss`` uses the activations of the latest train-mode forward pass of the
            gated model, so call this after the forward pass.
        """
        model = self._require_gated()
        config = self.loss_config
        frozen = global_step >= (1.0 - config.freeze_fraction) * self.num_training_steps
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
        return proportion, flops_loss, entropy_loss, bkd_loss

    def calibrate_to_target(self) -> float:
        """Flips the least certain gate decisions so the hard model lands nearest the target.

        Channels are ordered by how close their logit is to the decision boundary; the
        shortest prefix of flips (closing open channels when above the target, opening closed
        ones when below) that brings the hard FLOPs share closest to ``pruning_proportion`` is
        applied by moving those logits just across zero. Every group keeps a channel, and the
        shares compared are those of the kept counts after rounding to ``block_size``.

        Returns:
            The hard FLOPs share after calibration.
        """
        self._require_gated()
        with torch.no_grad():
            logits = torch.cat([gate.logits.detach() for gate in self.gates]).cpu()
            keep = self._gate_set.hard_masks().cpu()
            current = self._expected_flops.proportion(keep).item()
            closing = current > self.pruning_proportion
            candidates = torch.nonzero(keep > 0.5 if closing else keep < 0.5).flatten()
            order = candidates[logits[candidates].argsort(descending=not closing)]
            if closing:  # never close the last channel of a group
                offsets, protected = 0, set()
                for gate in self.gates:
                    group_logits = gate.logits.detach().cpu()
                    protected.add(offsets + int(group_logits.argmax()))
                    offsets += group_logits.numel()
                order = torch.tensor([int(i) for i in order if int(i) not in protected], dtype=torch.long)

            def share(count: int) -> float:
                trial = logits.clone()
                trial[order[:count]] = -0.05 if closing else 0.05
                return self._expected_flops.proportion(self._gate_set.masks_for_logits(trial)).item()

            low, high = 0, len(order)  # share(count) is monotone in count
            while low < high:
                middle = (low + high) // 2
                crossed = share(middle) <= self.pruning_proportion if closing else \
                    share(middle) >= self.pruning_proportion
                low, high = (low, middle) if crossed else (middle + 1, high)
            count = min((c for c in (low - 1, low) if 0 <= c <= len(order)),
                        key=lambda c: abs(share(c) - self.pruning_proportion))
            flipped = order[:count]
            new_logits = logits.clone()
            new_logits[flipped] = -0.05 if closing else 0.05
            offset = 0
            for gate in self.gates:
                size = gate.logits.numel()
                gate.logits.data.copy_(new_logits[offset:offset + size].to(gate.logits.device))
                offset += size
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
        """FLOPs of the eval-mode (hard-mask) model over the original FLOPs."""
        analysis = self._require_prepared()
        return analysis.predicted_flops(self.kept_classes()) / analysis.total_flops

    def remove_channels(self) -> DagModule:
        """A plain, slim DAG computing what the gated model computes in eval mode."""
        analysis = self._require_prepared()
        slim = remove_channels_from_dag(analysis, self.kept_classes())
        slim.train(self._require_gated().training)
        device = next(iter(self.model.parameters()), torch.zeros(0)).device
        return slim.to(device)


def _masks_inside(module: nn.Module, site) -> bool:
    """Whether the op applies the site's mask itself (its spec's masking facet): always for a
    normalisation, whose statistics must skip removed channels; else on input 0 only."""
    return spec_for(module).masking is not None and (site.kind == "norm" or site.input_index == 0)


def _build_gated_dag(analysis: ChannelAnalysis, gates: list[ChannelGate]) -> DagModule:
    dag = analysis.dag
    groups = analysis.prunable_groups
    group_of_class = np.full(len(analysis.atom_class), -1, dtype=np.int64)
    position_of_class = np.zeros(len(analysis.atom_class), dtype=np.int64)
    for slot, group in enumerate(groups):
        group_of_class[group.classes] = slot
        position_of_class[group.classes] = np.arange(group.size)
    gate_vertices = [InnerVertex(f"gate_{slot}", gate, [], qualified_name=group.name)
                     for slot, (group, gate) in enumerate(zip(groups, gates))]
    sites_by_vertex: dict[InnerVertex, list] = {}
    for site in analysis.consumer_sites:
        sites_by_vertex.setdefault(site.vertex, []).append(site)

    new_of = {vertex: vertex for vertex in dag.inputs}
    inner: list[InnerVertex] = list(gate_vertices)
    for vertex in dag.inner_vertices:
        predecessors = [new_of[p] for p in vertex.predecessors]
        module = vertex.module
        for site in sites_by_vertex.get(vertex, []):
            slots = [int(s) for s in dict.fromkeys(group_of_class[site.atoms]) if s >= 0]
            if not slots:
                continue
            offsets = {}
            start = 1
            for slot in slots:
                offsets[slot] = start
                start += groups[slot].size
            position_groups = group_of_class[site.atoms]
            index = np.zeros(len(site.atoms), dtype=np.int64)
            for slot in slots:
                where = position_groups == slot
                index[where] = offsets[slot] + position_of_class[site.atoms[where]]
            index = torch.as_tensor(index)
            gate_inputs = [gate_vertices[slot] for slot in slots]
            if _masks_inside(module, site):
                module = MaskedConsumer(module, index, site.axis, num_inputs=len(predecessors),
                                        records_energy=site.kind != "norm")
                predecessors = predecessors + gate_inputs
            else:
                mask_vertex = InnerVertex(f"{vertex.name}_mask{site.input_index}",
                                          MaskApply(site.axis, index),
                                          [predecessors[site.input_index], *gate_inputs])
                inner.append(mask_vertex)
                predecessors[site.input_index] = mask_vertex
        new_vertex = InnerVertex(vertex.name, module, predecessors, vertex.qualified_name)
        new_of[vertex] = new_vertex
        inner.append(new_vertex)
    gated = DagModule(list(dag.inputs), inner, [new_of[v] for v in dag.output_vertices],
                      dag.output_structure, name=f"{dag.name}_gated")
    gated.train(dag.training)
    gated.lint()
    return gated
