"""Finding modules whose train-mode ops the conversion leaves out.

A model is traced in eval mode, so a Python branch on ``self.training`` inside a module that
tracing goes through (not a leaf) is fixed to its eval branch: the DAG runs that branch in train
mode too. Where the train branch only changes constants (``dropout_p=p if self.training else
0.``) or dropout layers (which follow the DAG's mode anyway), nothing is lost; where it runs
other ops (an exponential moving average updated in training, an auxiliary head, noise added in
training), training the DAG, or the gated model made from it, differs from training the model.

:func:`warn_on_training_branches` finds those modules: the traced-through modules whose
``forward`` source branches on ``.training`` (``if``, ``elif``, ``while``, in the class or its bases;
cheap, and most models have none) are traced a second time in train mode, and each one whose op sequence differs gets a
:class:`~dagprune.errors.TrainingBranchWarning` naming it and the fix (keep it whole with
``leaf_modules=[...]``: a leaf runs its own forward, branch included).
"""

from __future__ import annotations

import functools
import inspect
import operator
import re
import warnings
from typing import Callable

import torch.fx as fx
from torch import nn

from dagprune.errors import TrainingBranchWarning
from dagprune.training_mode import module_mode

__all__ = ["branches_on_training", "traced_through_modules", "warn_on_training_branches", "writes_in_place"]

_BRANCH = re.compile(r"^\s*(?:if|elif|while)\b[^#\n]*\.training\b", re.MULTILINE)


def branches_on_training(cls: type) -> bool:
    """Whether the source of ``cls`` or of a base class below ``nn.Module`` (its forward and the
    methods the forward may call) has an ``if`` / ``elif`` / ``while`` on ``.training``."""
    return any(_class_branches_on_training(klass) for klass in cls.__mro__
               if issubclass(klass, nn.Module) and klass is not nn.Module)


@functools.lru_cache(maxsize=None)
def _class_branches_on_training(cls: type) -> bool:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return bool(_BRANCH.search(source))


def traced_through_modules(graph: fx.Graph) -> dict[str, type]:
    """Path -> type of every module tracing went inside (not the leaves the graph calls)."""
    found: dict[str, type] = {}
    for node in graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if not (node.op == "call_module" and path == node.target):
                found.setdefault(path, cls)
    return found


def warn_on_training_branches(graph: fx.Graph, source: nn.Module,
                              trace_in_train_mode: Callable[[nn.Module], fx.Graph | None]) -> list[str]:
    """Warns about each traced-through module of ``source`` whose train-mode ops differ from the
    eval-mode ``graph``; ``trace_in_train_mode(module)`` traces a module like ``source`` in train
    mode (None when it cannot). Returns the paths warned about."""
    modules = {"": type(source), **traced_through_modules(graph)}  # the model's own forward too
    suspects = {path: cls for path, cls in modules.items() if branches_on_training(cls)}
    if not suspects:
        return []
    with module_mode(source, training=True):
        train_graph = trace_in_train_mode(source)
    if train_graph is None:
        return []
    eval_ops, train_ops = _ops_by_module(graph, suspects), _ops_by_module(train_graph, suspects)
    differing = [path for path in suspects if eval_ops.get(path) != train_ops.get(path)]
    innermost = [path for path in differing if not any(_inside(other, path) for other in differing)]
    for path in innermost:
        name = suspects[path].__name__
        warnings.warn(
            f"module {path or '<root>'!r} ({name}) branches on self.training and runs other ops in train "
            "mode than in eval mode; the DAG follows its eval branch in both modes, so training the DAG "
            "(or its gated model) differs from training the model there. If its train-mode behaviour "
            f"matters, keep it whole: build_from_unstructured_module(model, leaf_modules=[{name}]) (its "
            "forward then runs as written; its channels are not pruned inside it)",
            TrainingBranchWarning, stacklevel=3)
    return innermost


def _ops_by_module(graph: fx.Graph, paths) -> dict[str, list[tuple[str, str]]]:
    """The ops each module runs that count: those the output depends on, and writes in place."""
    live = _live_nodes(graph)
    ops: dict[str, list[tuple[str, str]]] = {}
    for node in graph.nodes:
        if node not in live or node.op == "get_attr":
            continue
        for path in ("", *(path for path, _ in (node.meta.get("nn_module_stack") or {}).values())):
            if path in paths:
                ops.setdefault(path, []).append((node.op, str(node.target)))
    return ops


def _inside(path: str, ancestor: str) -> bool:
    return path != ancestor and (ancestor == "" or path.startswith(ancestor + "."))


_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def writes_in_place(node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument (``x.add_(y)``, ``x[i] = y``, ``x += y``)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    return node.op == "call_function" and (node.target in _IN_PLACE_OPERATORS or
                                           getattr(node.target, "__name__", "").endswith("_"))


def _live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes the output depends on, and those writes in place depend on (a check whose
    result nothing reads, such as torch's fast-path conditions, is left out)."""
    pending = [node for node in graph.nodes if node.op == "output" or writes_in_place(node)]
    live: set[fx.Node] = set()
    while pending:
        node = pending.pop()
        if node not in live:
            live.add(node)
            pending.extend(node.all_input_nodes)
    return live
