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

import contextlib
import inspect
import keyword
import types
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from dagprune.errors import ConversionError
from dagprune.example_inputs import ExampleInputs

__all__ = ["argument_values", "fixed_arguments", "default_arguments", "remove_fixed_placeholders",
           "traced_signature", "required_extras", "OutputType", "FIXED_META", "register_traced_default"]

_NAMED_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                inspect.Parameter.KEYWORD_ONLY)
_GUARDS = {torch._assert, getattr(fx._symbolic_trace, "_assert_is_none", None)} - {None}


_TRACED_DEFAULTS: list[tuple[type, str, Any]] = []


def register_traced_default(cls: type, argument: str, value: Any) -> None:
    """Traces a ``cls`` model (or subclass) whose example leaves ``argument`` out as called
    with ``argument=value``, instead of with the forward's own default.

    For arguments whose default makes a model build what a DAG cannot hold: a Hugging Face
    model's ``use_cache`` defaults to its config, which makes a key/value cache object, so
    :mod:`dagprune.transformers_layers` registers ``use_cache=False``. An example that gives the
    argument wins.

    >>> class Cached(nn.Module):
    ...     def forward(self, x, cache=True):
    ...         return x
    >>> register_traced_default(Cached, "cache", False)
    >>> fixed_arguments(Cached(), ExampleInputs((torch.ones(1),), {})), default_arguments(Cached())
    ({'cache': False}, {'cache': False})
    """
    _TRACED_DEFAULTS.append((cls, argument, value))


def _traced_default(model: nn.Module, parameter: inspect.Parameter) -> Any:
    for cls, argument, value in reversed(_TRACED_DEFAULTS):
        if argument == parameter.name and isinstance(model, cls):
            return value
    return parameter.default


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
    given = _given_values(names, inputs)
    fixed = {}
    for parameter in parameters:
        if parameter.name in given:
            if not isinstance(given[parameter.name], torch.Tensor):
                fixed[parameter.name] = given[parameter.name]
        elif parameter.default is not inspect.Parameter.empty:
            fixed[parameter.name] = _traced_default(model, parameter)
        else:
            raise ConversionError(f"example_inputs give no value for {parameter.name!r} of {where}, "
                                  "which has no default; pass it in example_inputs")
    return fixed


def default_arguments(model: nn.Module) -> dict[str, Any]:
    """The forward arguments that have defaults, fixed to them: how the model is traced without
    example inputs, as called with its required arguments only (``model(x)``). A proxy standing
    for such an argument would take the branches for a given value (``if mask is not None:``
    reads a mask the DAG then requires; ``if pre_logits:`` cannot be traced at all).

    >>> class Masked(nn.Module):
    ...     def forward(self, x, mask=None, scale=1.0):
    ...         return x if mask is None else x * mask
    >>> default_arguments(Masked())
    {'mask': None, 'scale': 1.0}
    """
    return {p.name: _traced_default(model, p) for p in _forward_parameters(model)
            if p.default is not inspect.Parameter.empty}


def argument_values(model: nn.Module, inputs: ExampleInputs) -> dict[str, Any]:
    """The example's tensors by the name of the forward argument they are given for (copies, so
    that in-place ops run while tracing leave the user's tensors alone)."""
    given = _given_values([p.name for p in _forward_parameters(model)], inputs)
    return {name: value.clone() for name, value in given.items() if isinstance(value, torch.Tensor)}


def _given_values(names: list[str], inputs: ExampleInputs) -> dict[str, Any]:
    """The example's values by argument name: positional ones named in signature order."""
    return {**dict(zip(names, inputs.args)), **inputs.kwargs}


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


def _signature_parameters(model: nn.Module, inputs: ExampleInputs) -> list[inspect.Parameter]:
    """The named parameters of ``model.forward`` followed by the example's keywords that only
    its ``**kwargs`` takes."""
    parameters = _forward_parameters(model)
    named = {p.name for p in parameters}
    kinds = {p.kind for p in inspect.signature(model.forward).parameters.values()}
    if inspect.Parameter.VAR_POSITIONAL in kinds and len(inputs.args) > len(parameters):
        raise ConversionError(f"{type(model).__name__}.forward takes *args; pass the values after its "
                              f"named arguments ({', '.join(sorted(named)) or 'none'}) by keyword in example_inputs")
    takes_kwargs = inspect.Parameter.VAR_KEYWORD in kinds
    extras = [name for name in inputs.kwargs if name not in named] if takes_kwargs else []
    bad = [name for name in extras
           if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_dagprune")]
    if bad:
        raise ConversionError(f"example_inputs keys {bad} are not Python argument names")
    return [*parameters, *(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=_EXTRA)
                           for name in extras)]


_EXTRA = None
"""The default a keyword taken by ``**kwargs`` gets in the traced signature (torch.fx records
defaults; :func:`required_extras` takes it away again, since the model has none)."""


def _forward_with_names(original, parameters: list[inspect.Parameter], finish):
    """``forward(self, a, b, ...)`` returning ``finish(original(self, a=a, b=b, ...))``
    (positional-only parameters passed positionally), with the globals of ``original`` (torch.fx
    wraps the functions it finds there)."""
    names = "".join(f", {p.name}" for p in parameters)
    passed = "".join(f", {p.name}" if p.kind == inspect.Parameter.POSITIONAL_ONLY else f", {p.name}={p.name}"
                     for p in parameters)
    source = (f"def make(_dagprune_original, _dagprune_finish):\n"
              f"    def forward(self{names}):\n"
              f"        return _dagprune_finish(_dagprune_original(self{passed}))\n"
              f"    return forward\n")
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<{original.__qualname__} as traced>", "exec"), namespace)  # noqa: S102
    made = namespace["make"](original, finish)
    first_default = next((i for i, p in enumerate(parameters) if p.default is not inspect.Parameter.empty),
                         len(parameters))
    defaults = tuple(p.default for p in parameters[first_default:]) or None
    return types.FunctionType(made.__code__, inspect.unwrap(original).__globals__, "forward",
                              defaults, made.__closure__)


def required_extras(graph: fx.Graph, model: nn.Module, inputs: ExampleInputs) -> None:
    """Makes the inputs of keywords only ``**kwargs`` takes required again (see :data:`_EXTRA`)."""
    named = {p.name for p in _forward_parameters(model)}
    for node in graph.nodes:
        if node.op == "placeholder" and node.target in inputs.kwargs and node.target not in named:
            node.args = ()


class OutputType:
    """The class of a dict-like output (e.g. a Hugging Face ``ModelOutput``) seen while tracing."""

    def __init__(self):
        self.value: type | None = None

    def plain(self, output):
        """``output`` as a plain dict if it is an instance of a dict subclass (its type recorded)."""
        if isinstance(output, dict) and type(output) is not dict:
            self.value = type(output)
            return dict(output)
        return output


@contextlib.contextmanager
def traced_signature(model: nn.Module, inputs: ExampleInputs, output_type: OutputType):
    """While active, ``model.forward`` (through a subclass of the model's class) names every
    argument the example passes, so that a forward taking ``*args`` / ``**kwargs`` (as Hugging
    Face models and their decorators do) can be traced, and returns a dict-like output (a
    ``ModelOutput``) as a plain dict, recording its class in ``output_type``. Module paths,
    parameters and the model's own class are unchanged afterwards."""
    original_class = type(model)
    forward = _forward_with_names(original_class.forward, _signature_parameters(model, inputs), output_type.plain)
    model.__class__ = type(original_class.__name__, (original_class,),
                           {"forward": forward, "__module__": original_class.__module__})
    try:
        yield
    finally:
        model.__class__ = original_class
