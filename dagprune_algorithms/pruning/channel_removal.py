"""Removing channels for real: the removal pass.

Given a :class:`~dagprune_algorithms.pruning.channel_groups.ChannelAnalysis` and the set of
kept channel classes, :func:`remove_channels_from_dag` builds a new plain DAG in which every
vertex's parameters are sliced and every shape constant (reshape sizes, split sizes, slices,
norm shapes) is rewritten for the kept channels, by the removal facet of each op's spec
(:mod:`dagprune.ops.spec`).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from dagprune import DagModule, InnerVertex, InputVertex
from dagprune.errors import PruningError
from dagprune.ops import spec_for
from dagprune.ops.channel_map import ChannelFreeMasks, FreeSize
from dagprune.ops.spec import describe_op
from dagprune.ops.templates import InputRef, map_template
from dagprune.parametrized import is_parametrized, materialized, reparametrized

from dagprune_algorithms.pruning.channel_groups import ChannelAnalysis

__all__ = ["remove_channels_from_dag", "remove_vertex_channels", "position_masks"]


def position_masks(layout: Any, keep_class: np.ndarray, keep_full: bool = False) -> Any:
    """Per-axis kept-position masks for a layout; axes that keep everything are omitted unless
    ``keep_full`` (then every channel-carrying axis has a mask)."""
    if isinstance(layout, dict):
        masks = {axis: keep_class[atoms] for axis, atoms in layout.items()}
        return {axis: mask for axis, mask in masks.items() if keep_full or not mask.all()}
    if isinstance(layout, (tuple, list)):
        return type(layout)(position_masks(item, keep_class, keep_full) for item in layout)
    return ChannelFreeMasks() if isinstance(layout, FreeSize) else {}


def _is_empty(masks: Any) -> bool:
    if isinstance(masks, dict):
        return not masks
    if isinstance(masks, (tuple, list)):
        return all(_is_empty(m) for m in masks)
    return True


def remove_channels_from_dag(analysis: ChannelAnalysis, keep_class: np.ndarray) -> DagModule:
    """A new DAG computing ``analysis.dag`` with only the kept channel classes.

    Args:
        analysis: the channel analysis of the (ungated) DAG.
        keep_class: boolean array over classes (indexed by class id); True = kept.
    """
    dag = analysis.dag
    new_vertices: dict[Any, Any] = {}
    inputs = []
    for vertex in dag.inputs:
        new_vertex = InputVertex(vertex.name, vertex.default, vertex.fixed)
        new_vertices[vertex] = new_vertex
        inputs.append(new_vertex)
    inner = []
    for vertex in dag.inner_vertices:
        module = remove_vertex_channels(analysis, vertex, keep_class)
        new_vertex = InnerVertex(vertex.name, module, [new_vertices[p] for p in vertex.predecessors],
                                 vertex.qualified_name)
        new_vertices[vertex] = new_vertex
        inner.append(new_vertex)
    retie_shared_parameters([(vertex.module, new_vertices[vertex].module) for vertex in dag.inner_vertices])
    slim = DagModule(inputs, inner, [new_vertices[v] for v in dag.output_vertices],
                     copy.deepcopy(dag.output_structure), name=dag.name)
    slim.train(dag.training)
    slim.lint()
    return slim


def retie_shared_parameters(pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    """Shares again, between the new modules, each parameter the old modules shared (tied
    embeddings and output heads), where the new copies came out alike (same shape and values):
    every vertex's module is copied on its own, which would untie them."""
    first_copy: dict[int, nn.Parameter] = {}
    for old_module, new_module in pairs:
        new_parameters = dict(new_module.named_parameters(remove_duplicate=False))
        for name, old in old_module.named_parameters(remove_duplicate=False):
            new = new_parameters.get(name)
            if new is None:
                continue
            shared = first_copy.setdefault(id(old), new)
            if shared is not new and shared.shape == new.shape and torch.equal(shared, new):
                owner_path, _, attribute = name.rpartition(".")
                setattr(new_module.get_submodule(owner_path) if owner_path else new_module, attribute, shared)


def _inner_mask(analysis: ChannelAnalysis, vertex: InnerVertex, keep_class: np.ndarray) -> np.ndarray | None:
    """Kept positions of the vertex's ``"inner"`` consumer site (channels the op creates and
    reads back itself), or None when it has none."""
    site = next((s for s in analysis.consumer_sites if s.vertex is vertex and s.kind == "inner"), None)
    return None if site is None else keep_class[site.atoms]


def remove_vertex_channels(analysis: ChannelAnalysis, vertex: InnerVertex, keep_class: np.ndarray) -> nn.Module:
    """A copy of the vertex's module with the removed channels cut out, by its spec's removal
    facet (the module of ``vertex`` in :func:`remove_channels_from_dag`'s result); channel counts
    it reads as numbers keep their values (see
    :class:`~dagprune_algorithms.pruning.channel_groups.FrozenSize`)."""
    frozen = {site.input_index: site.value for site in analysis.frozen_sizes
              if site.vertex is vertex and not keep_class[site.atoms].all()}
    module = _slim_module(analysis, vertex, keep_class)
    if frozen:
        module = copy.deepcopy(module) if module is vertex.module else module
        fill = lambda leaf: frozen.get(leaf.index, leaf) if isinstance(leaf, InputRef) else leaf  # noqa: E731
        module.args, module.kwargs = map_template(module.args, fill), map_template(module.kwargs, fill)
    return module


def _slim_module(analysis: ChannelAnalysis, vertex: InnerVertex, keep_class: np.ndarray) -> nn.Module:
    spec = spec_for(vertex.module)
    input_masks = [position_masks(analysis.layouts[p], keep_class, spec.full_masks)
                   for p in vertex.predecessors]
    output_mask = position_masks(analysis.layouts[vertex], keep_class)
    inner_mask = _inner_mask(analysis, vertex, keep_class) if spec.inner_masks else None
    if _is_empty(output_mask) and all(_is_empty(m) for m in input_masks) and (
            inner_mask is None or inner_mask.all()):
        return copy.deepcopy(vertex.module)
    if spec.removal is None:
        where = vertex.qualified_name or vertex.name
        raise PruningError(
            f"{where} ({describe_op(vertex.module)}) loses channels but its op spec "
            f"{spec.name!r} has no removal facet; give it one with "
            "dagprune.ops.register_op(OpSpec(..., removal=...), replace=True)")
    shapes = [analysis.values_shapes[p] for p in vertex.predecessors] + [analysis.values_shapes[vertex]]
    module = materialized(vertex.module) if is_parametrized(vertex.module) else vertex.module
    if spec.inner_masks:
        slim = spec.removal(module, input_masks, output_mask, shapes, inner_mask=inner_mask)
    else:
        slim = spec.removal(module, input_masks, output_mask, shapes)
    return reparametrized(slim, vertex.module) if module is not vertex.module else slim
