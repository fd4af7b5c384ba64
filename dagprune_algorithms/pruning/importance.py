"""Channel importance criteria, per channel class of a group, pluggable by name.

A criterion is ``criterion(analysis, group) -> importance per class of the group`` (higher is
kept first), registered with :func:`register_importance`; a unit names it with
``importance=...`` (``ChannelMutator({"default_args": {"importance": "taylor"}})``).

* ``"l1"``: mean absolute weight of each output filter over the group's producers (mmrazor's
  L1-norm criterion); needs no data.
* ``"bn_scale"``: absolute scale of the batch/layer norms that directly follow the producers
  (network-slimming criterion); falls back to ``"l1"`` where no norm follows.
* ``"taylor"``: ``|sum(weight x gradient)|`` over each output filter, the first-order Taylor
  estimate of the loss change when the filter is zeroed (Molchanov et al. 2019), averaged over
  the group's producers. It needs gradients: by name it reads the ``.grad`` of the producers'
  weights (one backward pass, run just before); :class:`~.iterative.ItePruneAlgorithm` instead
  averages it over the training steps since the previous prune with a
  :class:`TaylorScoreAccumulator`.

:class:`TaylorImportance` is the activation variant (``|sum(activation x gradient)|`` per
channel, Molchanov et al. 2017); its scores go in through
``ChannelMutator.set_choices(choices, scores=...)``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from dagprune.ops import spec_for

from dagprune_algorithms.pruning.channel_groups import ChannelAnalysis, ChannelGroup

__all__ = ["register_importance", "channel_importance", "IMPORTANCE_CRITERIA", "TaylorImportance",
           "TaylorScoreAccumulator", "filter_taylor_scores"]

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


def _producer_weight_and_axis(module: nn.Module, vertex) -> tuple[torch.Tensor, int] | None:
    """A producer's filters (a leaf tensor: a parameter) and their output-channel axis, from
    the importance facet of its op spec; None for ops without filters."""
    facet = spec_for(module).importance
    found = facet(module, vertex) if facet is not None else None
    if found is None or found.kind != "filter":
        return None
    return found.tensor, found.axis


def _producer_weight(module: nn.Module, vertex, analysis: ChannelAnalysis):
    """Weight of a producer with output channels on axis 0, or None."""
    found = _producer_weight_and_axis(module, vertex)
    return None if found is None else found[0].movedim(found[1], 0)


def _accumulate(group: ChannelGroup, analysis: ChannelAnalysis, per_position) -> np.ndarray:
    """Averages per-position scores of the group's producers into one score per class."""
    order = np.argsort(group.classes)
    sorted_classes = group.classes[order]
    totals, counts = np.zeros(group.size), np.zeros(group.size)
    for vertex, axis in group.producers:
        values = per_position(vertex, axis)
        classes = analysis.producer_classes(vertex, axis)
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
            facet = spec_for(user.module).importance
            found = facet(user.module, user) if facet is not None else None
            if found is not None and found.kind == "scale":
                return found.tensor.detach().abs().cpu().double().numpy()
        return None
    scale = _accumulate(group, analysis, per_position)
    return scale if scale.any() else l1_importance(analysis, group)


def filter_taylor_scores(weight: torch.Tensor, gradient: torch.Tensor, channel_axis: int = 0) -> torch.Tensor:
    """``|sum(weight x gradient)|`` over each output filter: the first-order Taylor estimate of
    how much the loss changes when the filter is zeroed.

    >>> weight = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    >>> filter_taylor_scores(weight, torch.tensor([[0.5, 0.5], [0.0, 9.0]]))
    tensor([1., 0.])
    """
    with torch.no_grad():
        return (weight.detach() * gradient).movedim(channel_axis, 0).flatten(1).sum(1).abs()


@register_importance("taylor")
def taylor_importance(analysis: ChannelAnalysis, group: ChannelGroup) -> np.ndarray:
    """:func:`filter_taylor_scores` of the producers' weights and their ``.grad`` now.

    Raises:
        PruningError: a producer's weight has no gradient (no backward pass ran).
    """
    without_gradient = []

    def per_position(vertex, axis):
        found = _producer_weight_and_axis(vertex.module, vertex)
        if found is None:
            return None
        weight, channel_axis = found
        if weight.grad is None:
            without_gradient.append(vertex)
            return None
        return filter_taylor_scores(weight, weight.grad, channel_axis).cpu().double().numpy()
    scores = _accumulate(group, analysis, per_position)
    if without_gradient:
        from dagprune.errors import PruningError
        vertex = without_gradient[0]
        raise PruningError(
            f"importance 'taylor' ranks the channels of group {group.name!r} by |weight x gradient|, but "
            f"the weight of {vertex.name!r} ({vertex.qualified_name}) has no gradient: run loss.backward() "
            "on the masked model right before set_choices, or prune with ItePruneAlgorithm, which "
            "averages the scores over the training steps between prunes")
    return scores


class TaylorScoreAccumulator(nn.Module):
    """Averages :func:`filter_taylor_scores` of the groups' producers over backward passes.

    A hook on each producer weight adds the scores of every backward pass that reaches it,
    so the model trains as usual. The sums and the number of passes are buffers (a state
    dict restores them exactly); :meth:`reset` starts a new average, :meth:`remove_hooks`
    stops accumulating.

    Args:
        analysis: the channel analysis ``groups`` belong to.
        groups: the groups to score (weights that do not require grad are skipped).

    >>> import dagprune
    >>> from dagprune_algorithms.pruning import find_channel_groups
    >>> dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)))
    >>> analysis = find_channel_groups(dag, (3, 4, 4))
    >>> taylor = TaylorScoreAccumulator(analysis, analysis.prunable_groups)
    >>> dag(torch.randn(2, 3, 4, 4)).sum().backward()
    >>> taylor.ready, taylor.importance(analysis.prunable_groups[0]).shape
    (True, (4,))
    """

    def __init__(self, analysis: ChannelAnalysis, groups: Sequence[ChannelGroup]):
        super().__init__()
        self.analysis = analysis
        self._slot_of_producer: dict = {}
        weights: list[tuple[torch.Tensor, int]] = []
        for group in groups:
            for vertex, axis in group.producers:
                found = _producer_weight_and_axis(vertex.module, vertex)
                if found is None or not found[0].requires_grad:
                    continue
                slot = next((i for i, (w, a) in enumerate(weights) if w is found[0] and a == found[1]), None)
                if slot is None:
                    slot = len(weights)
                    weights.append(found)
                    self.register_buffer(f"score_sum_{slot}", torch.zeros(
                        found[0].shape[found[1]], dtype=torch.float32, device=found[0].device))
                self._slot_of_producer[(vertex, axis)] = slot
        self.register_buffer("backward_passes", torch.zeros(len(weights), dtype=torch.long))
        self._handles = [weight.register_hook(self._accumulating_hook(slot, weight, channel_axis))
                         for slot, (weight, channel_axis) in enumerate(weights)]

    def _accumulating_hook(self, slot: int, weight: torch.Tensor, channel_axis: int):
        def accumulate(gradient):
            score_sum = getattr(self, f"score_sum_{slot}")
            score_sum += filter_taylor_scores(weight, gradient, channel_axis).to(score_sum)
            self.backward_passes[slot] += 1
        return accumulate

    @property
    def ready(self) -> bool:
        """Whether a backward pass reached the weights since the start or the last :meth:`reset`."""
        return bool((self.backward_passes > 0).any())

    def importance(self, group: ChannelGroup) -> np.ndarray:
        """Scores per class of ``group``: the mean over backward passes (0 without any)."""
        def per_position(vertex, axis):
            slot = self._slot_of_producer.get((vertex, axis))
            if slot is None:
                return None
            passes = max(int(self.backward_passes[slot]), 1)
            return (getattr(self, f"score_sum_{slot}") / passes).cpu().double().numpy()
        return _accumulate(group, self.analysis, per_position)

    def reset(self) -> None:
        """Clears the sums and the pass counts."""
        for buffer in self.buffers():
            buffer.zero_()

    def remove_hooks(self) -> None:
        """Stops accumulating (the scores so far stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


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
