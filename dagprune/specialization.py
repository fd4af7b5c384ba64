"""Specialising a model's forward on its example inputs while tracing.

Given example inputs, a forward argument they give as a tensor stays an input of the DAG;
an argument they give as anything else (``use_cache=False``, ``scale=2.0``, ``mask=None``), and
an argument they leave out that has a default, is fixed to that value: Python branches on it
(``if attention_mask is None``) take the branch the example takes, and the DAG does not take it
as an input. torch.fx guards such arguments with assertions; those are removed here, since the
DAG keeps such an argument as a *fixed* input (:class:`~dagprune.InputVertex`): it may be
passed, with the same value, so that the DAG is called like the model.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from dagprune.errors import ConversionError
from dagprune.example_inputs import ExampleInputs

__all__ = ["fixed_arguments", "remove_fixed_placeholders", "FIXED_META"]

_NAMED_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                inspect.Parameter.KEYWORD_ONLY)
_GUARDS = {torch._assert, getattr(fx._symbolic_trace, "_assert_is_none", None)} - {None}


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(model.forward).parameters.values() if p.kind in _NAMED_KINDS]


def fixed_arguments(model: nn.Module, inputs: ExampleInputs) -> dict[str, Any]:
    """The forward arguments fixed while tracing ``model`` on ``inputs`` (see the module).

    >>> class Scaled(nn.Module):
    ...     def forward(self, x, mask=None, scale=1.0):
    ...         return x * scale
    >>> fixed_arguments(Scaled(), ExampleInputs((torch.ones(1),), {"scale": 2.0}))
    {'mask': None, 'scale': 2.0}

    Raises:
        ConversionError: the inputs name an argument forward does not take, give more
            positional values than it has, or leave out an argument without a default.
    """
    parameters = _forward_parameters(model)
    names = [p.name for p in parameters]
    where = f"{type(model).__name__}.forward({', '.join(names)})"
    if len(inputs.args) > len(names):
        raise ConversionError(f"example_inputs give {len(inputs.args)} positional values to {where}")
    unknown = sorted(set(inputs.kwargs) - set(names))
    if unknown:
        raise ConversionError(f"example_inputs name {unknown}, which {where} does not take")
    given = {**dict(zip(names, inputs.args)), **inputs.kwargs}
    fixed = {}
    for parameter in parameters:
        if parameter.name in given:
            if not isinstance(given[parameter.name], torch.Tensor):
                fixed[parameter.name] = given[parameter.name]
        elif parameter.default is not inspect.Parameter.empty:
            fixed[parameter.name] = parameter.default
        else:
            raise ConversionError(f"example_inputs give no value for {parameter.name!r} of {where}, "
                                  "which has no default; pass it in example_inputs")
    return fixed


def _remove_guards(placeholder: fx.Node, graph: fx.Graph) -> None:
    """Erases the assertions torch.fx put on a fixed argument (and their comparisons)."""
    for user in list(placeholder.users):
        guard_users = list(user.users)
        if user.op == "call_function" and user.target in _GUARDS:
            graph.erase_node(user)
        elif all(g.op == "call_function" and g.target in _GUARDS for g in guard_users) and guard_users:
            for guard in guard_users:
                graph.erase_node(guard)
            graph.erase_node(user)


FIXED_META = "dagprune_fixed_argument"
"""Key of a placeholder's ``meta``: ``(argument name, value)`` of a fixed argument."""


def remove_fixed_placeholders(graph: fx.Graph, model: nn.Module, fixed: dict[str, Any]) -> None:
    """Unguards the placeholders of ``fixed`` arguments in a graph traced with them as
    torch.fx ``concrete_args`` (fx keeps them, renamed, in the signature's order) and marks
    them with :data:`FIXED_META`.

    Raises:
        ConversionError: the model's code uses a fixed argument beyond checking it (it is then
            not a constant of this trace).
    """
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    for parameter, placeholder in zip(_forward_parameters(model), placeholders):
        if parameter.name not in fixed:
            continue
        _remove_guards(placeholder, graph)
        if placeholder.users:
            raise ConversionError(
                f"{type(model).__name__}.forward uses its argument {parameter.name!r} beyond "
                "branching on it; pass it as a tensor in example_inputs")
        placeholder.meta[FIXED_META] = (parameter.name, fixed[parameter.name])
