"""Budgets: what ``pruning_proportion`` is a share of (FLOPs, parameters or latency).

Every budget is a :class:`BudgetCost`: a list of :class:`CostTerm` ``base x prod(kept fraction
of each factor)``, a factor being an array of channel classes (the positions of one tensor
axis) whose kept share scales the term, exactly like the FLOPs terms the op specs record
(:class:`~.channel_groups.FlopsTerm`).

* ``"flops"``: the FLOPs terms of the channel analysis.
* ``"params"``: one term per parameter tensor of every vertex, ``numel x prod(kept fraction
  of the classes along each sliced axis)``. Which axes are sliced, and by which classes, is
  not declared per op: it is read off the removal facets themselves by *probing*, removing
  a few random channel sets from each vertex (:func:`~.channel_removal.remove_vertex_channels`)
  and matching every parameter axis that shrinks with a channel-class array the vertex reads
  or writes (an input's or its output's axis, or the channels it creates and reads back
  inside). So the prediction is exact wherever the removal facet slices a parameter along such
  an array (a whole number of times: an LSTM's four gate blocks); a parameter it renames or
  reshapes otherwise (``nn.MultiheadAttention`` becomes separate projections) is counted as
  unpruned and its vertex listed in :attr:`BudgetCost.approximate`.
* ``"latency"``: see :mod:`.latency_table`.

:class:`ExpectedCost` turns a budget into a differentiable function of the gates' keep
probabilities, for the pruning loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np
import torch

from dagprune import InnerVertex
from dagprune.errors import PruningError
from dagprune.ops.channel_map import iter_layout_atoms

from dagprune_algorithms.pruning.channel_groups import ChannelAnalysis, ChannelGroup
from dagprune_algorithms.pruning.channel_removal import remove_vertex_channels

__all__ = ["BUDGETS", "CostTerm", "BudgetCost", "ExpectedCost", "check_budget", "flops_cost", "params_cost",
           "vertex_candidate_factors", "vertex_work_fractions", "KNOTS"]

BUDGETS = ("flops", "params", "latency")
"""The budgets ``ChannelPruning(budget=...)`` accepts."""

COST_NOUNS = {"flops": "FLOPs", "params": "parameters", "latency": "latency"}
"""How messages name what each budget counts."""

KNOTS = 17
"""Latency curves hold the cost at this many evenly spaced work fractions in [0, 1]."""

PROBES = 4
"""Random channel sets removed from each vertex to find which parameter axes they slice."""


def check_budget(budget) -> str:
    """``budget`` if it is one of :data:`BUDGETS`; raises :class:`PruningError` else.

    >>> check_budget("params")
    'params'
    """
    if budget not in BUDGETS:
        raise PruningError(f"budget must be one of {BUDGETS} (what pruning_proportion is a share of), "
                           f"got {budget!r}")
    return budget


@dataclasses.dataclass
class CostTerm:
    """``base x prod(mean(keep[factor]) for factor in factors)``: the cost of a part of
    ``vertex`` (a FLOPs count, a parameter tensor's size, a share of its work)."""

    vertex: InnerVertex
    base: float
    factors: list[np.ndarray]

    def fraction(self, keep_class: np.ndarray) -> float:
        """The kept share of the term for a boolean ``keep_class`` over classes."""
        fraction = 1.0
        for factor in self.factors:
            fraction *= keep_class[factor].mean() if len(factor) else 1.0
        return fraction


@dataclasses.dataclass
class BudgetCost:
    """What a budget counts, as a function of the kept channel classes.

    Linear budgets (FLOPs, parameters) cost ``sum(term.base x term.fraction)``. With
    ``curves`` (latency), the terms of a vertex give its *work fraction* (its FLOPs share, or
    for ops without FLOPs the kept share of its output), and ``curves[vertex]`` maps the work
    fraction, through :data:`KNOTS` evenly spaced knots, to seconds; ``constant`` is added.

    Attributes:
        budget: one of :data:`BUDGETS`.
        terms: the cost terms.
        num_classes: the number of channel classes (the length of a ``keep_class``).
        curves: vertex -> cost at the knots (latency only).
        constant: cost that no channel changes (latency: the DAG's own overhead).
        approximate: labels of vertices whose cost is not predicted exactly.
    """

    budget: str
    terms: list[CostTerm]
    num_classes: int
    curves: dict | None = None
    constant: float = 0.0
    approximate: list[str] = dataclasses.field(default_factory=list)

    @property
    def noun(self) -> str:
        """What the budget counts, for messages (``"FLOPs"``, ``"parameters"``, ``"latency"``)."""
        return COST_NOUNS[self.budget]

    @functools.cached_property
    def total(self) -> float:
        """The cost of the model keeping every channel."""
        return self.predicted(np.ones(self.num_classes, dtype=bool))

    def predicted(self, keep_class: np.ndarray) -> float:
        """The cost of the model keeping the classes where ``keep_class`` is True (float64;
        for ``"params"`` a whole number up to rounding)."""
        if self.curves is None:
            return float(sum(term.base * term.fraction(keep_class) for term in self.terms))
        work, knots = vertex_work_fractions(self.terms, keep_class), np.linspace(0.0, 1.0, KNOTS)
        return self.constant + float(sum(np.interp(work.get(vertex, 1.0), knots, curve)
                                         for vertex, curve in self.curves.items()))

    def share(self, keep_class: np.ndarray) -> float:
        """:meth:`predicted` over :attr:`total`."""
        total = self.total
        return self.predicted(keep_class) / total if total else 1.0

    def touched_share(self, gated_class: np.ndarray) -> float:
        """Share of the cost in vertices (latency) or terms that a gated class scales."""
        touched = [t for t in self.terms if any(gated_class[f].any() for f in t.factors)]
        if self.curves is None:
            part = sum(t.base for t in touched)
        else:
            part = sum(self.curves[v][-1] for v in {t.vertex for t in touched})
        return part / self.total if self.total else 0.0


def vertex_work_fractions(terms: Sequence[CostTerm], keep_class: np.ndarray) -> dict:
    """Each vertex's *work fraction*: the kept share of the sum of its terms' bases."""
    work, weight = {}, {}
    for term in terms:
        work[term.vertex] = work.get(term.vertex, 0.0) + term.base * term.fraction(keep_class)
        weight[term.vertex] = weight.get(term.vertex, 0.0) + term.base
    return {vertex: work[vertex] / weight[vertex] if weight[vertex] else 1.0 for vertex in work}


def flops_cost(analysis: ChannelAnalysis) -> BudgetCost:
    """The FLOPs budget: the analysis' FLOPs terms."""
    terms = [CostTerm(t.vertex, float(t.base_flops), t.factors) for t in analysis.flops_terms]
    return BudgetCost("flops", terms, len(analysis.atom_class))


# ------------------------------------------------------------------------------ parameters
def vertex_candidate_factors(analysis: ChannelAnalysis, vertex: InnerVertex,
                             gated_class: np.ndarray) -> list[np.ndarray]:
    """The class arrays ``vertex`` reads or writes that hold a gated class: the channel axes
    of its inputs and its output, and the channels it creates and reads back inside."""
    layouts = [analysis.layouts[p] for p in vertex.predecessors] + [analysis.layouts[vertex]]
    arrays = [atoms for layout in layouts for atoms in iter_layout_atoms(layout)]
    arrays += [site.atoms for site in analysis.consumer_sites if site.vertex is vertex and site.kind == "inner"]
    unique: dict[bytes, np.ndarray] = {}
    for atoms in arrays:
        atoms = np.asarray(atoms, dtype=np.int64)
        if len(atoms) and gated_class[atoms].any():
            unique.setdefault(atoms.tobytes(), atoms)
    return list(unique.values())


def _probe_keeps(analysis: ChannelAnalysis, count: int) -> list[np.ndarray]:
    """``count`` kept-class sets: the first keeps one class per prunable group (every gated
    axis shrinks), the others a random share of each group (at least one class)."""
    rng = np.random.default_rng(0x9A2A)
    keeps = []
    for index in range(count):
        keep = np.ones(len(analysis.atom_class), dtype=bool)
        share = (0.5, 0.3, 0.7)[(index - 1) % 3]
        for group in analysis.prunable_groups:
            kept = np.zeros(group.size, dtype=bool) if index == 0 else rng.random(group.size) < share
            kept[rng.integers(group.size)] = True
            keep[group.classes] = kept
        keeps.append(keep)
    return keeps


def _sliced_axes(shape: Sequence[int], probed_shapes: list, candidates: list[np.ndarray],
                 keeps: list[np.ndarray]) -> list[np.ndarray] | None:
    """The class array each shrinking axis of a parameter of ``shape`` follows (its size is
    a whole multiple of the array's kept count in every probe), or None if an axis follows none."""
    if any(probed is None or len(probed) != len(shape) for probed in probed_shapes):
        return None
    factors = []
    for axis, size in enumerate(shape):
        sizes = [probed[axis] for probed in probed_shapes]
        if all(s == size for s in sizes):
            continue
        match = next((atoms for atoms in candidates if size % len(atoms) == 0 and all(
            s == size // len(atoms) * int(keep[atoms].sum()) for s, keep in zip(sizes, keeps))), None)
        if match is None:
            return None
        factors.append(match)
    return factors


def params_cost(analysis: ChannelAnalysis) -> BudgetCost:
    """The parameter budget: one term per parameter tensor of every vertex (see the module
    docstring for how its sliced axes are found)."""
    gated = analysis.gated_class_mask()
    keeps = _probe_keeps(analysis, PROBES)
    terms, approximate = [], []
    for vertex in analysis.dag.inner_vertices:
        parameters = dict(vertex.module.named_parameters())
        candidates = vertex_candidate_factors(analysis, vertex, gated) if parameters else []
        if not candidates:
            terms += [CostTerm(vertex, float(p.numel()), []) for p in parameters.values()]
            continue
        probed = [{name: tuple(p.shape) for name, p in remove_vertex_channels(analysis, vertex, keep)
                   .named_parameters()} for keep in keeps]
        for name, parameter in parameters.items():
            factors = _sliced_axes(parameter.shape, [shapes.get(name) for shapes in probed], candidates, keeps)
            if factors is None:
                approximate.append(vertex.qualified_name or vertex.name)
            terms.append(CostTerm(vertex, float(parameter.numel()), factors or []))
    return BudgetCost("params", terms, len(analysis.atom_class), approximate=sorted(set(approximate)))


# ------------------------------------------------------------------------------ expectation
def _interpolate(curves: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of ``curves`` (values at evenly spaced knots on [0, 1]) at ``x[i]``, linearly
    interpolated; differentiable in ``x``."""
    segments = curves.shape[1] - 1
    position = x.clamp(0.0, 1.0) * segments
    index = position.detach().floor().clamp(max=segments - 1).long().unsqueeze(1)
    low, high = curves.gather(1, index).squeeze(1), curves.gather(1, index + 1).squeeze(1)
    return low + (high - low) * (position - index.squeeze(1))


class ExpectedCost:
    """Differentiable expected cost share of a gated model, a function of keep probabilities.

    Every term's kept share is ``prod_f mean(keep[f])``, each factor's mean a weighted sum over
    the probabilities of its prunable classes (one gather and one segmented sum for all
    factors, deterministic on every device). Linear
    budgets sum ``base x share``; latency sums each vertex's curve at its work fraction.
    Tables are float32, built once per device; nothing is read back to the host.
    """

    def __init__(self, cost: BudgetCost, groups: Sequence[ChannelGroup]):
        self.total = cost.total
        slot_of_class = np.full(cost.num_classes, -1, dtype=np.int64)
        offset = 0
        for group in groups:
            slot_of_class[group.classes] = offset + np.arange(group.size)
            offset += group.size
        gated = [t for t in cost.terms if any((slot_of_class[f] >= 0).any() for f in t.factors if len(f))]
        factors = _factor_table(gated, slot_of_class)
        scale = max(self.total, 1e-30)
        if cost.curves is None:
            fixed = sum(t.base for t in cost.terms) - sum(t.base for t in gated)
            extra = (torch.tensor([t.base for t in gated], dtype=torch.float64) / scale,)
        else:
            fixed, extra = _latency_tables(cost, gated, scale)
        self.constant_share = (fixed + cost.constant) / scale if self.total else 0.0
        extra = tuple(t.float() if t.is_floating_point() else t for t in extra)
        self._tables = {torch.device("cpu"): (*factors, *extra)}

    def tables(self, device: torch.device) -> tuple:
        """The float32 tables on ``device``, moved there once and kept."""
        if device not in self._tables:
            self._tables[device] = tuple(t.to(device) for t in self._tables[torch.device("cpu")])
        return self._tables[device]

    def proportion(self, keep_probabilities: torch.Tensor) -> torch.Tensor:
        """Expected cost / original cost for the concatenated keep probabilities of all groups
        (float32, on their device)."""
        slots, weights, offsets, constants, term_of_factor, *extra = self.tables(keep_probabilities.device)
        products = weights * keep_probabilities.float()[slots]
        fractions = torch.segment_reduce(products, "sum", offsets=offsets) + constants
        log_fraction = torch.log(fractions.clamp_min(1e-12))
        per_term = torch.exp(torch.zeros_like(extra[0]).index_add(0, term_of_factor, log_fraction))
        if len(extra) == 1:
            return (extra[0] * per_term).sum() + self.constant_share
        term_weights, term_vertex, fixed_work, curves = extra
        work = fixed_work.index_add(0, term_vertex, term_weights * per_term)
        return _interpolate(curves, work).sum() + self.constant_share


def _factor_table(terms: list[CostTerm], slot_of_class: np.ndarray) -> tuple:
    """The gated factors of ``terms`` as segments: (the slot and the weight of each entry,
    factor by factor; each factor's offsets into them, with the end; each factor's constant
    kept share; the term of each factor)."""
    slots, weights, counts, constants, term_of_factor = [], [], [], [], []
    for term_index, term in enumerate(terms):
        for factor in (f for f in term.factors if len(f) and (slot_of_class[f] >= 0).any()):
            slots_of_factor = slot_of_class[factor]
            gated = slots_of_factor >= 0
            unique, repeats = np.unique(slots_of_factor[gated], return_counts=True)
            slots.append(unique)
            weights.append(repeats / len(factor))
            counts.append(len(unique))
            constants.append((~gated).sum() / len(factor))
            term_of_factor.append(term_index)
    # whole arrays, not Python lists, into torch: same values, without a float per element
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
    return (torch.from_numpy(_joined(slots, np.int64)), torch.from_numpy(_joined(weights, np.float64)).float(),
            torch.from_numpy(offsets), torch.tensor(constants, dtype=torch.float32),
            torch.tensor(term_of_factor, dtype=torch.long))


def _joined(arrays: list[np.ndarray], dtype) -> np.ndarray:
    """``arrays`` concatenated as ``dtype`` (empty when there are none)."""
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype=dtype)


def _latency_tables(cost: BudgetCost, gated: list[CostTerm], scale: float) -> tuple[float, tuple]:
    """(cost of the vertices no gate touches, (weight of each gated term in its vertex's work,
    the vertex of each gated term, the vertices' fixed work, their curves over ``scale``))."""
    weight: dict = {}
    for term in cost.terms:
        weight[term.vertex] = weight.get(term.vertex, 0.0) + term.base
    vertices = list(dict.fromkeys(t.vertex for t in gated))
    index = {vertex: i for i, vertex in enumerate(vertices)}
    fixed_work = np.zeros(len(vertices))
    gated_ids = {id(t) for t in gated}
    for term in cost.terms:
        if term.vertex in index and id(term) not in gated_ids:
            fixed_work[index[term.vertex]] += term.base / weight[term.vertex]
    fixed = sum(curve[-1] for vertex, curve in cost.curves.items() if vertex not in index)
    curves = np.array([cost.curves[v] for v in vertices], dtype=np.float64).reshape(len(vertices), KNOTS)
    return fixed, (torch.tensor([t.base / weight[t.vertex] for t in gated], dtype=torch.float64),
                   torch.tensor([index[t.vertex] for t in gated], dtype=torch.long),
                   torch.tensor(fixed_work), torch.tensor(curves / scale))
