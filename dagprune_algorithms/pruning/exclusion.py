"""Leaving modules alone: the channel groups an excluded module touches keep every channel.

A module is named by its path in the original model (``vertex.qualified_name``, the names of
``model.named_modules()``), or by an :mod:`fnmatch` pattern over those paths. A pattern excludes
a module when it matches the module's path or the path of a module containing it, so
``"layer1"`` excludes everything inside ``layer1`` and ``"stem*"`` every module whose path
starts with ``stem``. Ops the model calls as functions (additions, reshapes) have no path.

A group is *touched* by an excluded module when any of its channels flows into or out of that
module (its input or output tensors, or channels it creates and reads back inside, such as
attention head dims). Such a group stays unpruned: it gets no gate, and its FLOPs count as
fixed in the FLOPs loss and in ``prunable_proportion``. So the excluded module's weights keep
their exact shapes after removal.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Sequence

import numpy as np

from dagprune import DagModule, InnerVertex
from dagprune.errors import PruningError
from dagprune.ops.channel_map import iter_layout_atoms

from dagprune_algorithms.pruning.channel_groups import ChannelAnalysis, ChannelGroup

__all__ = ["check_exclude_patterns", "module_matches", "excluded_vertices", "exclude_modules"]


def check_exclude_patterns(exclude) -> tuple[str, ...]:
    """``exclude`` as a tuple of non-empty strings (None gives an empty tuple).

    Raises:
        PruningError: ``exclude`` is a single string or holds something other than strings.

    >>> check_exclude_patterns(["stem*", "head.fc"])
    ('stem*', 'head.fc')
    """
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        raise PruningError(f"exclude must be a list of module paths or patterns, got the string "
                           f"{exclude!r}; write exclude=[{exclude!r}]")
    patterns = tuple(exclude)
    bad = [p for p in patterns if not isinstance(p, str) or not p.strip()]
    if bad:
        raise PruningError(f"exclude holds {bad[0]!r}; give module paths (e.g. 'head.fc') or fnmatch "
                           "patterns (e.g. 'stem*') as non-empty strings")
    return patterns


def module_matches(path: str | None, pattern: str) -> bool:
    """Whether ``pattern`` names the module at ``path`` or a module containing it.

    >>> module_matches("layer1.0.conv1", "layer1"), module_matches("stem.conv", "stem*")
    (True, True)
    >>> module_matches("layer1.0.conv1", "conv1"), module_matches(None, "*")
    (False, False)
    """
    if not path:
        return False
    parts = path.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:end]), pattern) for end in range(len(parts), 0, -1))


def _module_paths(dag: DagModule) -> list[str]:
    """Every module path of the DAG's vertices and of the modules containing them, in order."""
    paths: dict[str, None] = {}
    for vertex in dag.inner_vertices:
        if vertex.qualified_name:
            parts = vertex.qualified_name.split(".")
            for end in range(1, len(parts) + 1):
                paths.setdefault(".".join(parts[:end]))
    return list(paths)


def _unmatched_pattern_error(dag: DagModule, pattern: str) -> PruningError:
    paths = _module_paths(dag)
    close = difflib.get_close_matches(pattern, paths, n=5, cutoff=0.4)
    shown = close or sorted(paths, key=lambda path: path.count("."))[:8]  # outermost first
    return PruningError(
        f"exclude pattern {pattern!r} matches no module of {dag.name}; "
        f"{'closest' if close else 'its modules include'}: {', '.join(repr(p) for p in shown)}"
        f"{'' if close or len(paths) <= 8 else ', ...'}; give a module path as model.named_modules() "
        "names it, or an fnmatch pattern such as 'layer1.*'")


def excluded_vertices(dag: DagModule, patterns: Sequence[str]) -> dict[InnerVertex, str]:
    """The vertices whose module ``patterns`` exclude, each with the first pattern matching it.

    Raises:
        PruningError: a pattern matches no module (the message lists real module names).
    """
    found: dict[InnerVertex, str] = {}
    for pattern in check_exclude_patterns(patterns):
        matched = [v for v in dag.inner_vertices if module_matches(v.qualified_name, pattern)]
        if not matched:
            raise _unmatched_pattern_error(dag, pattern)
        for vertex in matched:
            found.setdefault(vertex, pattern)
    return found


def _touching_vertex(analysis: ChannelAnalysis, vertices: Sequence[InnerVertex]) -> np.ndarray:
    """Per class, the index in ``vertices`` of the first vertex it flows into or out of, or -1."""
    touching = np.full(len(analysis.atom_class), -1, dtype=np.int64)
    sites_of: dict[InnerVertex, list] = {}
    for site in analysis.consumer_sites:
        sites_of.setdefault(site.vertex, []).append(site.atoms)
    for index, vertex in enumerate(vertices):
        values = [analysis.layouts.get(value) for value in (*vertex.predecessors, vertex)]
        for classes in [*iter_layout_atoms(values), *sites_of.get(vertex, [])]:
            touching[classes[touching[classes] < 0]] = index
    return touching


def exclude_modules(analysis: ChannelAnalysis, patterns: Sequence[str]) -> list[ChannelGroup]:
    """Marks the prunable groups of ``analysis`` that an excluded module touches as not prunable
    (in place; their ``reason`` names the module and the pattern).

    Returns:
        The groups newly marked.

    Raises:
        PruningError: a pattern matches no module of the DAG.

    >>> import dagprune
    >>> from torch import nn
    >>> from dagprune_algorithms.pruning import find_channel_groups
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1))
    >>> analysis = find_channel_groups(dagprune.build_from_unstructured_module(model), (3, 4, 4))
    >>> [group.name for group in exclude_modules(analysis, ["2"])]
    ['1']
    >>> [group.name for group in analysis.prunable_groups]
    ['0']
    """
    excluded = excluded_vertices(analysis.dag, patterns)
    vertices = list(excluded)
    touching = _touching_vertex(analysis, vertices)
    marked = []
    for group in analysis.prunable_groups:
        producer = next((v for v, _ in group.producers if v in excluded), None)
        hits = touching[group.classes]
        if producer is None and not (hits >= 0).any():
            continue
        vertex = producer if producer is not None else vertices[int(hits[hits >= 0].min())]
        group.prunable = False
        group.reason = f"excluded: {vertex.qualified_name} matches exclude pattern {excluded[vertex]!r}"
        marked.append(group)
    return marked
