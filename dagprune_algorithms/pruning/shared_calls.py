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

import numpy as np

from dagprune import DagModule
from dagprune.ops.channel_map import tensor_layout
from dagprune.ops.parameter import ParameterOp

__all__ = ["tie_shared_calls"]


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
    if isinstance(first, (tuple, list)):  # a module returning several tensors (a recurrent layer)
        others = other if isinstance(other, (tuple, list)) and len(other) == len(first) else [None] * len(first)
        for item, paired in zip(first, others):
            _unify_layouts(ctx, item, paired)
        return
    for axis, atoms in tensor_layout(first).items():
        paired = tensor_layout(other).get(axis)
        if paired is not None and len(paired) == len(atoms):
            ctx.unify(atoms, paired)
        else:  # this call's channels on the axis cannot follow the other's
            ctx.barrier(atoms, "a module called again with other channels")
            if paired is not None:
                ctx.barrier(paired, "a module called again with other channels")


def _consumed(ctx, vertex) -> dict:
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
            _unify_layouts(ctx, layouts[other], layouts[first])
            consumed = _consumed(ctx, other)
            for key in set(first_consumed) | set(consumed):
                _unify_layouts(ctx, {0: first_consumed.get(key, np.zeros(0, dtype=np.int64))},
                               {0: consumed.get(key, np.zeros(0, dtype=np.int64))})
