"""Channel importance criteria, per channel class of a group, pluggable by name.

* ``"l1"``: mean absolute weight of each output filter over the group's producers (mmrazor's
  L1-norm criterion); needs no data.
* ``"bn_scale"``: absolute scale of the batch/layer norms that directly follow the producers
  (network-slimming criterion); falls back to ``"l1"`` where no norm follows.
* ``"taylor"``: ``|activation x gradient|`` accumulated with :class:`TaylorImportance` from
  real batches (first-order Taylor estimate of the loss change when a channel goes).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from dagprune import ops

from dagprune_algorithms.pruning.channel_groups import ChannelAnalysis, ChannelGroup

__all__ = ["register_importance", "channel_importance", "IMPORTANCE_CRITERIA", "TaylorImportance"]

IMPORTANCE_CRITERIA: dict[str, Callable[[ChannelAnalysis, ChannelGroup], np.ndarray]] = {}


def register_importance(name: str):
    """Registers ``criterion(analysis, group) -> importance per class of the group``."""
    def decorator(criterion):
        IMPORTANCE_CRITERIA[name] = criterion
        return criterion
    return decorator


def channel_importance(analysis: ChannelAnalysis, group: ChannelGroup, criterion: str = "l1") -> np.ndarray:
    """Importance of each channel class of ``group`` (higher = more important)."""
    if criterion not in IMPORTANCE_CRITERIA:
        import difflib
        from dagprune.errors import PruningError
        close = difflib.get_close_matches(criterion, IMPORTANCE_CRITERIA, n=3)
        raise PruningError(f"unknown importance criterion {criterion!r}; available: "
                           f"{sorted(IMPORTANCE_CRITERIA)}" + (f" (closest: {close})" if close else ""))
    return IMPORTANCE_CRITERIA[criterion](analysis, group)


def _producer_weight(module: nn.Module, vertex, analysis: ChannelAnalysis):
    """Weight of a producer with output channels on axis 0, or None."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return module.weight
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return module.weight.transpose(0, 1)
    if isinstance(module, ops.FunctionalOp) and module.function_name == "torch.nn.functional.linear":
        weight = module.argument(1, "weight")
        if isinstance(weight, ops.InputRef):
            source = vertex.predecessors[weight.index]
            return getattr(source.module, "value", None)
    return None


def _accumulate(group: ChannelGroup, analysis: ChannelAnalysis, per_position) -> np.ndarray:
    """Averages per-position scores of the group's producers into one score per class."""
    order = np.argsort(group.classes)
    sorted_classes = group.classes[order]
    totals, counts = np.zeros(group.size), np.zeros(group.size)
    for vertex, axis in group.producers:
        values = per_position(vertex, axis)
        layout = analysis.layouts[vertex]
        classes = layout.get(axis) if isinstance(layout, dict) else None
        if values is None or classes is None or len(classes) != len(values):
            continue
        found = np.clip(np.searchsorted(sorted_classes, classes), 0, group.size - 1)
        inside = sorted_classes[found] == classes
        slots = order[found[inside]]
        np.add.at(totals, slots, np.asarray(values)[inside])
        np.add.at(counts, slots, 1)
    return np.where(counts > 0, totals / np.maximum(counts, 1), 0.0)


@register_importance("l1")
def l1_importance(analysis: ChannelAnalysis, group: ChannelGroup) -> np.ndarray:
    """Mean absolute weight of each output filter, averaged over the group's producers."""
    def per_position(vertex, axis):
        weight = _producer_weight(vertex.module, vertex, analysis)
        if weight is None:
            return None
        return weight.detach().abs().flatten(1).mean(1).cpu().double().numpy()
    return _accumulate(group, analysis, per_position)


@register_importance("bn_scale")
def bn_scale_importance(analysis: ChannelAnalysis, group: ChannelGroup) -> np.ndarray:
    """|gamma| of the norm layers reading the producers' outputs (L1 where there is none)."""
    users = analysis.dag.users()

    def per_position(vertex, axis):
        for user in users.get(vertex, []):
            module = user.module
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm,
                                   nn.GroupNorm)) and getattr(module, "weight", None) is not None:
                return module.weight.detach().abs().cpu().double().numpy()
        return None
    scale = _accumulate(group, analysis, per_position)
    return scale if scale.any() else l1_importance(analysis, group)


class TaylorImportance:
    """Accumulates ``|sum(activation * gradient)|`` per channel of each producer output.

    Use: ``taylor = TaylorImportance(analysis)``, then for a few batches run forward and
    backward of ``analysis.dag`` inside ``with taylor: ...``, then read ``taylor.importance(group)``.
    """

    def __init__(self, analysis: ChannelAnalysis):
        self.analysis = analysis
        self.scores: dict = {}
        self._handles: list = []

    def __enter__(self):
        for group in self.analysis.prunable_groups:
            for vertex, axis in group.producers:
                self._handles.append(vertex.module.register_forward_hook(self._hook(vertex, axis)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, vertex, axis):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return

            def on_grad(grad):
                reduce_axes = [a for a in range(output.ndim) if a != axis]
                score = (output.detach() * grad).sum(reduce_axes).abs().cpu().double().numpy()
                self.scores[(vertex, axis)] = self.scores.get((vertex, axis), 0) + score
            output.register_hook(on_grad)
        return hook

    def importance(self, group: ChannelGroup) -> np.ndarray:
        """Accumulated Taylor scores per class of ``group``."""
        return _accumulate(group, self.analysis, lambda v, a: self.scores.get((v, a)))
