"""The gated model: the DAG with a mask multiplied in wherever a gated channel is consumed.

:func:`build_gated_dag` is shared by :class:`~.channel_pruning.ChannelPruning` (learnable gates)
and :class:`~.mutator.ChannelMutator` (units holding fixed masks): any module returning a
group's mask can stand in for its gate.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dagprune import DagModule, InnerVertex
from dagprune.ops import spec_for
from dagprune.ops.shape import ShapeQueryOp
from dagprune.ops.specs.indexing import TENSOR_ATTRIBUTES

from dagprune_algorithms.pruning.channel_groups import ChannelAnalysis
from dagprune_algorithms.pruning.gates import MaskApply, MaskedConsumer

__all__ = ["build_gated_dag"]


def _masks_inside(module: nn.Module, site) -> bool:
    """Whether the op applies the site's mask itself (its spec's masking facet): always for a
    normalisation, whose statistics must skip removed channels, and for channels the op reads
    back inside itself (kind ``"inner"``); else on input 0 only."""
    return spec_for(module).masking is not None and (site.kind in ("norm", "inner") or site.input_index == 0)


def _reads_metadata_only(module: nn.Module) -> bool:
    """Whether the op reads only its input's sizes or dtype (``x.shape``, ``x.size(1)``), not
    its values."""
    if not isinstance(module, ShapeQueryOp):
        return False
    return module.function_name != "getattr" or module.argument(1, "name") not in TENSOR_ATTRIBUTES


def _same_site(norm_site, site) -> bool:
    return site.kind == "mask" and site.axis == norm_site.axis and np.array_equal(site.atoms, norm_site.atoms)


def _folded_sites(dag: DagModule, sites_by_vertex: dict) -> tuple[set, set]:
    """Masks moved into a normalisation's output (:class:`MaskedConsumer`'s ``scales_output``):
    where every reader of a norm masks its output with the norm's own mask (a layer norm feeding
    the q/k/v projections), the norm multiplies the mask into its per-channel weight instead,
    exactly, and the readers skip theirs. Returns the ids of the norm sites that fold and of
    the reader sites left unmasked."""
    folded, skipped = set(), set()
    outputs = set(dag.output_vertices)
    users = dag.users()
    for vertex, sites in sites_by_vertex.items():
        norm_sites = [site for site in sites if site.kind == "norm"]
        if len(norm_sites) != 1 or vertex in outputs or not spec_for(vertex.module).scales_output:
            continue
        readers = [(user, index) for user in users[vertex] if not _reads_metadata_only(user.module)
                   for index, p in enumerate(user.predecessors) if p is vertex]
        matches = [next((s for s in sites_by_vertex.get(user, []) if s.input_index == index
                         and _same_site(norm_sites[0], s)), None) for user, index in readers]
        if readers and all(matches):
            folded.add(id(norm_sites[0]))
            skipped.update(id(site) for site in matches)
    return folded, skipped


def build_gated_dag(analysis: ChannelAnalysis, gates: list[nn.Module]) -> DagModule:
    """A new DAG computing ``analysis.dag`` with ``gates[i]``'s mask applied to the channels of
    prunable group ``i`` wherever they are consumed (the gates are vertices without inputs).
    Where a normalisation's readers all mask its output with its own mask, the norm applies it
    in its weight instead (see :func:`_folded_sites`)."""
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
    folded, skipped = _folded_sites(dag, sites_by_vertex)

    new_of = {vertex: vertex for vertex in dag.inputs}
    inner: list[InnerVertex] = list(gate_vertices)
    for vertex in dag.inner_vertices:
        predecessors = [new_of[p] for p in vertex.predecessors]
        module = vertex.module
        for site in sites_by_vertex.get(vertex, []):
            slots = [s for s in dict.fromkeys(group_of_class[site.atoms].tolist()) if s >= 0]
            if not slots or id(site) in skipped:
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
                                        records_energy=site.kind == "mask", scales_output=id(site) in folded)
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
