"""Channel-group discovery: which channels of a DAG must be removed together.

Every channel a producer creates (a conv or linear output channel, an element of a parameter
along one of its axes) is an *atom*. The analysis runs the DAG once on an example input and,
vertex by vertex, applies the coupling facet of its op's spec (see
:mod:`dagprune.ops.spec`). A facet receives, for each input, its
*layout* (for each tensor axis that carries atoms, the atom id at every position), and returns
the output's layout while recording constraints:

* ``unify(a, b)``: position-wise, these atoms are the same channel (a residual add, a
  consumer's input channel matching its producer, q and k head dims in a dot product);
* ``tie(a)``: these atoms must be kept or removed together (a whole conv group, the same head
  dim in every head);
* ``barrier(a)``: these atoms must never be removed (they reach the model's inputs or outputs,
  or an op whose channel behaviour is unknown or mixes channels).

Union-find over atoms gives the *channel classes* (one kept/removed decision each). Classes
created by the same producer axis form a :class:`ChannelGroup` with one gate logit per class.
A group with any barrier class is not prunable. Channel maps stay compact: one integer per
position of a tracked axis, never per element of a tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dagprune import DagModule, InnerVertex, Vertex
from dagprune.errors import PruningError
from dagprune.flops import vertex_flops
from dagprune.ops import spec_for
from dagprune.ops.base import FunctionalOp
from dagprune.ops.channel_map import FreeSize, Layout, ShapeTag, is_size_layout, iter_layout_atoms
from dagprune.ops.spec import describe_op
from dagprune.example_inputs import ExampleInputs
from dagprune.shape_prop import analysis_mode, resolve_inputs, stream_values, value_shape
from dagprune_algorithms.pruning.shared_calls import tie_shared_calls

__all__ = ["ChannelGroup", "ChannelAnalysis", "CouplingContext", "find_channel_groups", "Layout",
           "ShapeTag", "HEAD_PRUNING_MODES"]

HEAD_PRUNING_MODES = ("dims", "heads")
"""How attention is pruned: ``"dims"`` removes the same head dimensions from every head (the
number of heads stays); ``"heads"`` removes whole heads (q, k and v of a head together; the head
dimension stays). Attention with a single head is always pruned by dims."""


def check_head_pruning(mode) -> str:
    """``mode`` if it is one of :data:`HEAD_PRUNING_MODES`; raises :class:`PruningError` else."""
    if mode not in HEAD_PRUNING_MODES:
        raise PruningError(f"head_pruning must be one of {HEAD_PRUNING_MODES} (same dims removed "
                           f"from every head, or whole heads), got {mode!r}")
    return mode


@dataclasses.dataclass
class ConsumerSite:
    """A place where channels of a vertex input are consumed (mixed into other channels).

    In the gated model the input is multiplied by the channel mask here. ``kind`` is
    ``"mask"`` for a plain multiply, ``"norm"`` for a normalisation whose statistics must
    skip removed channels, ``"inner"`` for an op that also reads back channels it creates
    itself (a recurrent layer's hidden units, attention head dims): the site's positions are
    then the op's own convention (its input features followed by those channels) and its
    masking facet applies the whole mask.
    """

    vertex: InnerVertex
    input_index: int
    axis: int
    atoms: np.ndarray
    kind: str = "mask"


@dataclasses.dataclass
class FrozenSize:
    """A channel count read at run time and used as a number (``q.size(-1) ** -0.5``,
    ``math.sqrt(d)``, ``torch.tensor(d)``): input ``input_index`` of ``vertex``. Where removal
    changes the count, the slim model holds ``value``, the count of the model it came from, so
    it computes what the gated model does. ``atoms`` are the axis' atoms (classes after the
    analysis)."""

    vertex: InnerVertex
    input_index: int
    value: int | float
    atoms: np.ndarray


@dataclasses.dataclass
class FlopsTerm:
    """FLOPs of one vertex, ``base_flops x prod(kept fraction over each factor's atoms)``."""

    vertex: InnerVertex
    base_flops: int
    factors: list[np.ndarray]


class CouplingContext:
    """Atoms, their union-find and the facts rules record; given to every coupling rule.

    Args:
        users: vertex -> the vertices that read it (rules that look ahead use it).
        head_pruning: one of :data:`HEAD_PRUNING_MODES`.
    """

    def __init__(self, users: dict | None = None, head_pruning: str = "dims"):
        self.users = users or {}
        self.head_pruning = head_pruning
        self._parent = np.zeros(0, dtype=np.int64)
        self._barrier = np.zeros(0, dtype=bool)
        self._producer_axes: list[tuple[InnerVertex, int, np.ndarray]] = []
        self._pending_unions: list[tuple[np.ndarray, np.ndarray]] = []
        self._deferred: list[tuple[int, Callable[[Callable[[np.ndarray], np.ndarray]], None]]] = []
        self.consumer_sites: list[ConsumerSite] = []
        self.frozen_sizes: list[FrozenSize] = []
        self.flops_terms: list[FlopsTerm] = []
        self.barrier_reasons: dict[int, str] = {}
        self.current_vertex: InnerVertex | None = None

    # -- atoms -------------------------------------------------------------------------------
    def fresh(self, count: int) -> np.ndarray:
        """``count`` new atoms, each its own class."""
        start = len(self._parent)
        self._parent = np.concatenate([self._parent, np.arange(start, start + count)])
        self._barrier = np.concatenate([self._barrier, np.zeros(count, dtype=bool)])
        return np.arange(start, start + count)

    def produce(self, count: int, axis: int) -> np.ndarray:
        """New atoms for the output channels of the current vertex along ``axis``."""
        atoms = self.fresh(count)
        self.mark_producer(atoms, axis)
        return atoms

    def mark_producer(self, atoms: np.ndarray, axis: int) -> None:
        """Declares existing atoms (e.g. a weight parameter's rows) as output channels of the
        current vertex, so that they form a channel group."""
        self._producer_axes.append((self.current_vertex, axis, np.asarray(atoms)))

    def unify(self, first: np.ndarray, second: np.ndarray) -> None:
        """Position-wise identifies two equally long atom arrays."""
        first, second = np.asarray(first).ravel(), np.asarray(second).ravel()
        if first.shape != second.shape:
            raise ValueError(f"cannot unify {first.shape} atoms with {second.shape} atoms")
        self._pending_unions.append((first, second))

    def tie(self, atoms: np.ndarray) -> None:
        """Makes all ``atoms`` one class (kept or removed together)."""
        atoms = np.asarray(atoms).ravel()
        if atoms.size > 1:
            self.unify(atoms[1:], np.full(atoms.size - 1, atoms[0]))

    def barrier(self, atoms: np.ndarray, reason: str = "") -> None:
        """Marks atoms as never removable."""
        atoms = np.asarray(atoms).ravel()
        if atoms.size:
            self._barrier[atoms] = True
            key = int(atoms[0])
            if reason and key not in self.barrier_reasons:
                where = _vertex_label(self.current_vertex) if self.current_vertex else "model boundary"
                self.barrier_reasons[key] = f"{where}: {reason}"

    def barrier_layout(self, layout: Any, reason: str = "") -> None:
        """Marks every atom in a (possibly nested) layout as never removable."""
        for atoms in iter_layout_atoms(layout):
            self.barrier(atoms, reason)

    def size_used_as_number(self, input_index: int, layout: Any, value: Any, output: Any, reason: str) -> None:
        """A channel count (``layout``, a :class:`ShapeTag`) reaches the current vertex as a plain
        number: where the vertex holds its arguments as a template (a functional op) and makes
        a float or a tensor of it (a scale), the slim model keeps the count's value. Otherwise
        its atoms are barred: a whole shape, a module called with it, and an int made of it,
        which may shape a tensor later (``x.reshape(B * C * n, ...)``)."""
        vertex = self.current_vertex
        holds_constants = vertex is not None and isinstance(vertex.module, FunctionalOp)
        if holds_constants and isinstance(layout, ShapeTag) and type(value) in (int, float) \
                and (type(output) is float or isinstance(output, torch.Tensor)):
            self.frozen_sizes.append(FrozenSize(vertex, input_index, value, layout.all_atoms))
        else:
            self.barrier_layout(layout, reason)

    def consume(self, vertex: InnerVertex, input_index: int, axis: int, atoms: np.ndarray,
                kind: str = "mask") -> None:
        """Records that ``vertex`` mixes the channels of its input ``input_index`` on ``axis``."""
        self.consumer_sites.append(ConsumerSite(vertex, input_index, axis, np.asarray(atoms), kind))

    def count_flops(self, vertex: InnerVertex, base_flops: int, factors: Sequence[np.ndarray]) -> None:
        """Records that ``vertex``'s FLOPs scale with the kept fraction of each factor."""
        if base_flops:
            self.flops_terms.append(FlopsTerm(vertex, int(base_flops), [np.asarray(f) for f in factors]))

    def defer(self, rule: Callable[[Callable[[np.ndarray], np.ndarray]], None], stage: int = 1) -> None:
        """Runs ``rule(class_of)`` once every vertex has recorded its unions: ``class_of(atoms)``
        gives their classes as they stand then, so a rule may choose its unions by what the rest
        of the model ties (a group norm keeps whole groups where the convolutions tie them).
        Rules run by ``stage``; each stage sees the unions of the stages before it (a grouped
        convolution's choice, stage 0, before the norms', stage 1)."""
        self._deferred.append((stage, rule))

    # -- resolution --------------------------------------------------------------------------
    def resolve(self) -> np.ndarray:
        """Runs the deferred rules, applies all unions; returns the class (root atom) of every
        atom."""
        for stage in sorted({stage for stage, _ in self._deferred}):
            classes = self._components()
            for rule in [rule for rule_stage, rule in self._deferred if rule_stage == stage]:
                rule(lambda atoms: classes[np.asarray(atoms)])
        self._deferred = []
        return self._components()

    def _components(self) -> np.ndarray:
        if not self._pending_unions:
            return np.arange(len(self._parent))
        first = np.concatenate([pair[0] for pair in self._pending_unions])
        second = np.concatenate([pair[1] for pair in self._pending_unions])
        return _connected_components(len(self._parent), first, second)


def _connected_components(count: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Smallest atom id of each atom's component (edges ``first[i] -- second[i]``).

    Vectorised union-find: each round links the root of the larger id to the root of the
    smaller id for every edge, then compresses paths fully; a few rounds suffice.
    """
    parent = np.arange(count)

    def compress():
        nonlocal parent
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                return
            parent = jumped

    while True:
        root_first, root_second = parent[first], parent[second]
        differ = root_first != root_second
        if not differ.any():
            return parent
        low = np.minimum(root_first[differ], root_second[differ])
        high = np.maximum(root_first[differ], root_second[differ])
        np.minimum.at(parent, high, low)
        compress()


@dataclasses.dataclass
class ChannelGroup:
    """Channels that are pruned by one gate.

    Attributes:
        index: position of the group in :attr:`ChannelAnalysis.groups`.
        classes: the channel classes of the group (one gate logit each), in producer order.
        producers: ``(vertex, axis)`` of the producers whose output channels form the group.
        prunable: False when a class reaches the model's boundary or an opaque op.
        reason: why the group is not prunable.
    """

    index: int
    classes: np.ndarray
    producers: list[tuple[InnerVertex, int]]
    prunable: bool
    reason: str = ""

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def name(self) -> str:
        vertex, _ = self.producers[0]
        return vertex.qualified_name or vertex.name


@dataclasses.dataclass
class ChannelAnalysis:
    """Everything channel pruning needs to know about a DAG.

    Attributes:
        dag: the analysed DAG.
        groups: all channel groups (prunable or not).
        layouts: vertex -> layout of its output, with atoms replaced by their classes.
        atom_class: class of every atom.
        consumer_sites, flops_terms, frozen_sizes: see :class:`ConsumerSite`,
            :class:`FlopsTerm`, :class:`FrozenSize`.
        total_flops: FLOPs of the unpruned DAG for the analysed input (batch 1, or the
            example inputs' batch).
        input_shape_without_batch: the shape analysed, or None when ``example_inputs`` were.
        example_inputs: the inputs the DAG was analysed on.
    """

    dag: DagModule
    input_shape_without_batch: tuple | None
    head_pruning: str
    groups: list[ChannelGroup]
    layouts: dict[Vertex, Any]
    atom_class: np.ndarray
    consumer_sites: list[ConsumerSite]
    flops_terms: list[FlopsTerm]
    total_flops: int
    values_shapes: dict[Vertex, Any]
    example_inputs: ExampleInputs | None = None
    frozen_sizes: list[FrozenSize] = dataclasses.field(default_factory=list)

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [group for group in self.groups if group.prunable]

    def gated_class_mask(self) -> np.ndarray:
        """Boolean array over classes: True for classes of prunable groups."""
        gated = np.zeros(len(self.atom_class), dtype=bool)
        for group in self.prunable_groups:
            gated[group.classes] = True
        return gated

    def predicted_flops(self, keep_class: np.ndarray) -> float:
        """FLOPs of the model keeping only the classes where ``keep_class`` is True."""
        total = 0.0
        for term in self.flops_terms:
            fraction = 1.0
            for factor in term.factors:
                fraction *= keep_class[factor].mean() if len(factor) else 1.0
            total += term.base_flops * fraction
        return total

    def producer_classes(self, vertex: InnerVertex, axis: int) -> np.ndarray | None:
        """The classes along a producer's output ``axis``; for an op returning a tuple (a
        recurrent layer's ``(output, h_n)``), along that axis of its first item. None where the
        channels appear in no output (attention head dims)."""
        layout = self.layouts.get(vertex)
        while isinstance(layout, (tuple, list)) and layout:
            layout = layout[0]
        return layout.get(axis) if isinstance(layout, dict) else None

    def class_position(self) -> dict[int, tuple[int, int]]:
        """Maps each class of a prunable group to ``(group index, channel index in group)``."""
        found = {}
        for group in self.prunable_groups:
            for position, cls in enumerate(group.classes):
                found[int(cls)] = (group.index, position)
        return found


def _vertex_label(vertex: InnerVertex) -> str:
    """The model's module path a vertex came from (and the vertex's name when it differs)."""
    path = vertex.qualified_name
    return vertex.name if not path or path == vertex.name else f"{path} (vertex {vertex.name})"


def apply_coupling(ctx: CouplingContext, vertex: InnerVertex, layouts: list, values: list,
                   output: Any) -> Any:
    """Applies the coupling facet of ``vertex``'s op spec and checks its result.

    Sizes read from channel axes reach only facets that declare ``reads_sizes``; for other
    facets they are barriers (a channel count used in a way that is not followed).
    """
    spec = spec_for(vertex.module)
    if not spec.reads_sizes and any(is_size_layout(layout) for layout in layouts):
        layouts = list(layouts)
        for index, layout in enumerate(layouts):
            if is_size_layout(layout):
                ctx.size_used_as_number(index, layout, values[index], output,
                                        f"channel count used by {describe_op(vertex.module)}")
                layouts[index] = None
    layout = spec.coupling(ctx, vertex, vertex.module, layouts, values, output)
    return _fit_layout(ctx, layout, output)


def _fit_layout(ctx: CouplingContext, layout: Any, output: Any) -> Any:
    """Drops (and bars) atoms that do not fit the output's shape: a facet's safety net."""
    if isinstance(layout, ShapeTag):
        if isinstance(output, int) and output == len(layout.atoms):
            return layout
        ctx.barrier(layout.all_atoms, "size tag does not match the value")
        return None
    if isinstance(layout, FreeSize):
        return layout if type(output) is int else None
    if isinstance(layout, dict):
        if not isinstance(output, torch.Tensor):
            ctx.barrier_layout(layout, "channels flow into a non-tensor value")
            return None
        fitted = {}
        for axis, atoms in layout.items():
            if 0 <= axis < output.ndim and output.shape[axis] == len(atoms):
                fitted[axis] = atoms
            else:
                ctx.barrier(atoms, "layout does not match output shape")
        return fitted or None
    if isinstance(layout, (tuple, list)) and isinstance(output, (tuple, list)) \
            and len(layout) == len(output):
        return type(layout)(_fit_layout(ctx, item, value) for item, value in zip(layout, output))
    if layout is not None:
        ctx.barrier_layout(layout, "layout does not match output structure")
    return None


def find_channel_groups(dag: DagModule, input_shape_without_batch: Sequence | None = None,
                        head_pruning: str = "dims", example_inputs: Any = None) -> ChannelAnalysis:
    """Finds the channel groups of ``dag`` by running it once on a random input (batch 1) of
    ``input_shape_without_batch``, or on ``example_inputs`` (a tensor, a tuple of positional
    values or a dict of keyword values of any dtype, e.g. token IDs).

    ``head_pruning`` says how attention is pruned (see :data:`HEAD_PRUNING_MODES`).

    >>> import dagprune, torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> analysis = find_channel_groups(dagprune.build_from_unstructured_module(model), (3, 8, 8))
    >>> [(g.name, g.size, g.prunable) for g in analysis.groups]
    [('0', 8, True), ('3', 4, False)]
    """
    check_head_pruning(head_pruning)
    inputs = resolve_inputs(dag, input_shape_without_batch, example_inputs)
    context = CouplingContext(dag.users(), head_pruning)
    layouts, shapes, unscaled_flops = _couple_vertices(dag, inputs, context)
    tie_shared_calls(dag, layouts, context)
    for vertex in dag.output_vertices:
        context.barrier_layout(layouts[vertex], "reaches the model output")
    atom_class = context.resolve()
    barrier_classes = np.zeros(len(atom_class), dtype=bool)
    barrier_classes[atom_class[context._barrier]] = True
    reasons = {int(atom_class[atom]): reason for atom, reason in context.barrier_reasons.items()}

    signature = _class_signatures(layouts, context._producer_axes, atom_class)
    groups = []
    for classes, producers in _group_members(context._producer_axes, atom_class, signature):
        blocked = [int(c) for c in classes[barrier_classes[classes]]]
        reason = next((reasons[c] for c in blocked if c in reasons), "barrier") if blocked else ""
        groups.append(ChannelGroup(len(groups), classes, producers,
                                   prunable=not blocked and len(classes) > 1,
                                   reason=reason or ("a single channel" if len(classes) < 2 else "")))
    resolved_layouts = {vertex: _map_layout(layout, atom_class) for vertex, layout in layouts.items()}
    for site in context.consumer_sites:
        site.atoms = atom_class[site.atoms]
    for term in context.flops_terms:
        term.factors = [atom_class[f] for f in term.factors]
    for frozen in context.frozen_sizes:
        frozen.atoms = atom_class[frozen.atoms]
    counted = {term.vertex for term in context.flops_terms}
    for vertex, flops in unscaled_flops.items():  # FLOPs no rule scaled (opaque ops) stay constant
        if vertex not in counted and flops:
            context.flops_terms.append(FlopsTerm(vertex, flops, []))
    total = sum(term.base_flops for term in context.flops_terms)
    shape = None if example_inputs is not None else tuple(input_shape_without_batch)
    return ChannelAnalysis(dag, shape, head_pruning, groups, resolved_layouts, atom_class,
                           context.consumer_sites, context.flops_terms, total, shapes, inputs,
                           context.frozen_sizes)


def _couple_vertices(dag: DagModule, inputs: ExampleInputs, context: CouplingContext) -> tuple[dict, dict, dict]:
    """Runs ``dag`` on ``inputs`` once, applying each vertex's coupling rule as its value is
    computed (values are dropped as the forward drops them, so the pass holds about one
    forward's activations). Returns every vertex's layout and shape, and the FLOPs of the
    inner vertices whose rule recorded no FLOPs term by the time it ran (a deferred rule may
    still record one)."""
    layouts: dict[Vertex, Any] = {}
    shapes: dict[Vertex, Any] = {}
    unscaled_flops: dict[Vertex, int] = {}
    with analysis_mode(dag):
        for vertex, input_values, value in stream_values(dag, inputs):
            shapes[vertex] = value_shape(value)
            if not isinstance(vertex, InnerVertex):
                layouts[vertex] = None
                continue
            context.current_vertex = vertex
            terms_before = len(context.flops_terms)
            layouts[vertex] = apply_coupling(context, vertex, [layouts[p] for p in vertex.predecessors],
                                             input_values, value)
            if not any(term.vertex is vertex for term in context.flops_terms[terms_before:]):
                unscaled_flops[vertex] = vertex_flops(vertex, input_values, value)
    context.current_vertex = None
    return layouts, shapes, unscaled_flops


def _class_signatures(layouts: dict, producer_axes: list, atom_class: np.ndarray) -> np.ndarray:
    """A hash per class of the set of tensor axes it appears in and of the producer axes that
    create it.

    Classes with the same signature appear in exactly the same tensors, so they form one
    group; a group keeping at least one channel then leaves no tensor axis empty (the halves
    of a split channel axis, for instance, become separate groups). Channels an op creates and
    reads back inside itself (attention head dims) appear in no tensor: their producer axes
    keep the groups of different ops apart.
    """
    signature = np.zeros(len(atom_class), dtype=np.uint64)
    every_atoms = [atoms for layout in layouts.values() for atoms in iter_layout_atoms(layout)]
    every_atoms += [atoms for _, _, atoms in producer_axes]
    if not every_atoms:
        return signature
    keys = np.random.default_rng(0x5EED).integers(1, 2 ** 63, size=len(every_atoms), dtype=np.uint64)
    classes, owner = _classes_with_owner(every_atoms, atom_class)
    count = max(len(atom_class), 1)
    present = np.sort(owner * count + classes)  # np.unique's hashing is slower than a sort here
    present = present[np.concatenate([[True], present[1:] != present[:-1]])]  # once per axis
    np.add.at(signature, present % count, keys[present // count])
    return signature


def _classes_with_owner(atom_arrays: list, atom_class: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The classes of all ``atom_arrays`` concatenated, and the index of the array each came from."""
    arrays = [np.asarray(atoms, dtype=np.int64).ravel() for atoms in atom_arrays]
    owner = np.repeat(np.arange(len(arrays)), [len(atoms) for atoms in arrays])
    return atom_class[np.concatenate(arrays)], owner


def _group_members(producer_axes: list, atom_class: np.ndarray, signature: np.ndarray) -> list:
    """``(classes, producers)`` per signature, both in order of first appearance along the
    producer axes (the groups too)."""
    if not producer_axes:
        return []
    flat, owner = _classes_with_owner([atoms for _, _, atoms in producer_axes], atom_class)
    if not flat.size:
        return []
    first = np.sort(np.unique(flat, return_index=True)[1])
    classes = flat[first]  # each class once, by first appearance
    _, group_first, group_of_class = np.unique(signature[classes], return_index=True,
                                               return_inverse=True)
    rank = np.empty(len(group_first), dtype=np.int64)
    rank[np.argsort(group_first)] = np.arange(len(group_first))
    group_of_class = rank[group_of_class.ravel()]
    by_group = np.argsort(group_of_class, kind="stable")
    bounds = np.cumsum(np.bincount(group_of_class, minlength=len(rank)))[:-1]
    members = [(group_classes, []) for group_classes in np.split(classes[by_group], bounds)]
    group_of_atom_class = np.zeros(len(atom_class), dtype=np.int64)
    group_of_atom_class[classes] = group_of_class
    pair = owner * len(rank) + group_of_atom_class[flat]
    for key in pair[np.sort(np.unique(pair, return_index=True)[1])]:
        vertex, axis, _ = producer_axes[key // len(rank)]
        producers = members[key % len(rank)][1]
        if (vertex, axis) not in producers:
            producers.append((vertex, axis))
    return members


def _map_layout(layout: Any, atom_class: np.ndarray) -> Any:
    if isinstance(layout, dict):
        return {axis: atom_class[atoms] for axis, atoms in layout.items()}
    if isinstance(layout, ShapeTag):
        return None  # removal rewrites constants only; run-time sizes follow by themselves
    if isinstance(layout, (tuple, list)):
        return type(layout)(_map_layout(item, atom_class) for item in layout)
    return layout
