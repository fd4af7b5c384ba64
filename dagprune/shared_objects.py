"""Modules and tensors a DAG holds in several places (tied weights, shared layers).

Saving records, for every object reachable under more than one path, all its paths
(:func:`shared_objects`); loading makes those paths one object again (:func:`restore_sharing`).
"""

from __future__ import annotations

import torch
from torch import nn

from dagprune.dag_module import DagModule
from dagprune.errors import SerializationError

__all__ = ["shared_objects", "restore_sharing"]


def shared_objects(dag: DagModule) -> dict[str, list[list[str]]]:
    """Groups of paths that reach one object: ``{"modules": [[owner, alias, ...]], ...}``.

    Paths inside an aliased module are left out: restoring the module shares them too.
    """
    modules = _paths_by_identity(dag.named_modules(remove_duplicate=False))
    aliases = [path for group in modules for path in group[1:]]

    def outside_aliases(groups):
        kept = [[p for p in group if not any(p.startswith(alias + ".") for alias in aliases)]
                for group in groups]
        return [group for group in kept if len(group) > 1]

    return {"modules": outside_aliases(modules),
            "parameters": outside_aliases(_paths_by_identity(
                dag.named_parameters(remove_duplicate=False))),
            "buffers": outside_aliases(_paths_by_identity(
                dag.named_buffers(remove_duplicate=False)))}


def _paths_by_identity(named_objects) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for path, value in named_objects:
        groups.setdefault(id(value), []).append(path)
    return [paths for paths in groups.values() if len(paths) > 1]


def restore_sharing(dag: DagModule, shared: dict) -> None:
    """Makes every alias path of :func:`_shared_objects`' groups reach its group's owner."""
    for group in shared.get("modules", []):
        owner = dag.get_submodule(group[0])
        for alias in group[1:]:
            _share_module(dag, alias, owner)
    for kind, registry in (("parameters", "_parameters"), ("buffers", "_buffers")):
        for group in shared.get(kind, []):
            owner = _tensor_at(dag, group[0], registry)
            for alias in group[1:]:
                parent_path, _, name = alias.rpartition(".")
                current = _tensor_at(dag, alias, registry)
                if current.shape != owner.shape or current.dtype != owner.dtype:
                    raise SerializationError(f"shared {kind[:-1]} {alias!r} does not match "
                                             f"{group[0]!r} (shape or dtype differs)")
                getattr(dag.get_submodule(parent_path), registry)[name] = owner


def _share_module(dag: DagModule, alias: str, owner: nn.Module) -> None:
    parent_path, _, name = alias.rpartition(".")
    parent = dag.get_submodule(parent_path)
    current = parent._modules.get(name)
    if current is owner:
        return
    if type(current) is not type(owner):
        raise SerializationError(f"shared module {alias!r} is a {type(current).__name__}, not a "
                                 f"{type(owner).__name__} like the module it shares")
    if any(module is owner for module in _modules_along(dag, parent_path)):
        raise SerializationError(f"shared module {alias!r} would contain itself (its owner is "
                                 "one of the modules above it)")
    holder = dag.get_submodule(parent_path.rpartition(".")[0]) if "." in parent_path else dag
    if isinstance(holder, DagModule) and holder.vertex_modules is parent:
        holder.replace_module(holder.vertex(name), owner)  # keeps the vertex and registry in step
    else:
        parent._modules[name] = owner


def _modules_along(dag: DagModule, path: str) -> list[nn.Module]:
    """The modules from ``dag`` down to the module at ``path``, both included."""
    modules = [dag]
    for name in path.split(".") if path else []:
        modules.append(modules[-1].get_submodule(name))
    return modules


def _tensor_at(dag: DagModule, path: str, registry: str) -> torch.Tensor:
    parent_path, _, name = path.rpartition(".")
    tensor = getattr(dag.get_submodule(parent_path), registry).get(name)
    if tensor is None:
        raise SerializationError(f"the graph shares {path!r}, which is not a {registry[1:-1]}")
    return tensor


