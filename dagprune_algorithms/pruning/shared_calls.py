"""Modules called more than once share their weights, so every call must lose the same channels.

A block applied twice (ALBERT's shared layers, a Siamese encoder, a recurrence unrolled in the
forward) appears as several vertices holding one module; a parameter read twice as several
:class:`~dagprune.ops.parameter.ParameterOp` vertices holding one tensor. Pruned call by call,
each copy would keep other channels: the slim model would hold a different copy per call (and
could outgrow the original). :func:`tie_shared_calls` unifies, call by call, the channels of each
call's output and the channels each call consumes, so the copies come out alike and are shared
again after removal.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from dagprune import DagModule
from dagprune.ops.channel_map import tensor_layout
from dagprune.ops.parameter import ParameterOp

__all__ = ["tie_shared_calls"]

_UNPAIRED = "a module called again with other channels"


def _weights_key(module) -> int | None:
    """What the calls share: the parameter a ParameterOp reads, or the module itself when it
    holds parameters; None for a module without any."""
    if isinstance(module, ParameterOp):
        return id(module.value)
    return id(module) if next(module.parameters(), None) is not None else None


def _calls_by_weights(dag: DagModule) -> list[list]:
    calls: dict[int, list] = defaultdict(list)
    for vertex in dag.inner_vertices:
        key = _weights_key(vertex.module)
        if key is not None:
            calls[key].append(vertex)
    return [vertices for vertices in calls.values() if len(vertices) > 1]


def _unify_layouts(ctx, first: Any, other: Any) -> None:
    """Unifies two calls' layouts axis by axis; an axis with channels in one call that the other
    does not pair up (absent, or of another length) is barred in both."""
    if isinstance(first, (tuple, list)) or isinstance(other, (tuple, list)):  # several tensors out
        if isinstance(first, (tuple, list)) and isinstance(other, (tuple, list)) and len(first) == len(other):
            for item, paired in zip(first, other):
                _unify_layouts(ctx, item, paired)
        else:
            ctx.barrier_layout((first, other), _UNPAIRED)
        return
    first, other = tensor_layout(first), tensor_layout(other)
    for axis in set(first) | set(other):
        atoms, paired = first.get(axis), other.get(axis)
        if atoms is not None and paired is not None and len(atoms) == len(paired):
            ctx.unify(atoms, paired)
        else:
            for unpaired in (atoms, paired):
                if unpaired is not None:
                    ctx.barrier(unpaired, _UNPAIRED)


def _consumed(ctx, vertex) -> dict:
    """The channels ``vertex`` consumes, keyed by where (input, axis, kind): paired like axes."""
    return {(site.input_index, site.axis, site.kind): site.atoms
            for site in ctx.consumer_sites if site.vertex is vertex}


def tie_shared_calls(dag: DagModule, layouts: dict, ctx) -> None:
    """See the module docstring: for every further call of a shared module, its output layout
    and its consumed channels are unified with the first call's (or barred where they do not
    pair up)."""
    for vertices in _calls_by_weights(dag):
        first, first_consumed = vertices[0], _consumed(ctx, vertices[0])
        for other in vertices[1:]:
            _unify_layouts(ctx, layouts[first], layouts[other])
            _unify_layouts(ctx, first_consumed, _consumed(ctx, other))
