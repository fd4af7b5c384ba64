"""Layers called with constant arguments besides their tensor inputs (:class:`ModuleCallOp`).

``self.lstm(x, None)`` or ``self.attention(x, x, x, need_weights=False)`` become one vertex
holding a :class:`ModuleCallOp`: the layer and its argument templates. When the layer's spec
``accepts_calls``, the call has that spec (its facets read the arguments with
:func:`layer_call`); otherwise it has the ``module_call`` spec below: the layer's FLOPs, and a
barrier for channels.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from dagprune.ops.flop_counting import measured_if_black_box
from dagprune.ops.parameter import ModuleCallOp
from dagprune.ops.spec import OpSpec, opaque_coupling
from dagprune.ops.templates import InputRef, fill_template

__all__ = ["SPECS", "LayerCall", "layer_call", "called_module", "with_layer"]


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """How a vertex calls a layer: the layer, and for each argument of its ``forward`` (by
    name) the template passed: an :class:`InputRef` to one of the vertex's inputs, a constant,
    or a container of those (an LSTM's ``(h_0, c_0)``)."""

    layer: nn.Module
    arguments: dict

    def input_index(self, name: str) -> int | None:
        """The vertex input passed as argument ``name``, or None for a constant (or none)."""
        template = self.arguments.get(name)
        return template.index if isinstance(template, InputRef) else None

    def value(self, name: str, values: list, default: Any = None) -> Any:
        """Argument ``name`` for the vertex inputs ``values`` (``default`` when not passed)."""
        return fill_template(self.arguments[name], values) if name in self.arguments else default

    def run(self, values: list, parameters: dict[str, torch.Tensor]) -> Any:
        """Calls the layer on the vertex inputs ``values`` with some of its parameters replaced
        (``torch.func.functional_call``): how a masking facet applies masked weights."""
        arguments = {name: fill_template(template, values) for name, template in self.arguments.items()}
        return torch.func.functional_call(self.layer, parameters, (), arguments)


def layer_call(module: nn.Module, num_inputs: int) -> LayerCall | None:
    """The layer ``module`` calls and its arguments: ``module`` itself called with the vertex's
    ``num_inputs`` inputs as positional arguments, or the layer inside a :class:`ModuleCallOp`.
    None when the arguments do not fit the layer's ``forward``.

    >>> call = layer_call(ModuleCallOp(nn.LSTM(2, 3), (InputRef(0), None)), 1)
    >>> call.input_index("input"), call.arguments["hx"]
    (0, None)
    """
    if isinstance(module, ModuleCallOp):
        layer, args, kwargs = module.module, module.args, module.kwargs
    else:
        layer, args, kwargs = module, tuple(InputRef(i) for i in range(num_inputs)), {}
    try:
        bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    return LayerCall(layer, dict(bound.arguments))


def with_layer(module: nn.Module, layer: nn.Module) -> nn.Module:
    """``layer`` in place of the layer ``module`` calls: ``layer`` itself, or a
    :class:`ModuleCallOp` calling it with ``module``'s arguments."""
    if isinstance(module, ModuleCallOp):
        return ModuleCallOp(layer, copy.deepcopy(module.args), copy.deepcopy(module.kwargs))
    return layer


def called_module(call: ModuleCallOp, inputs: list) -> tuple[nn.Module, list]:
    """The module a :class:`ModuleCallOp` calls, and its positional arguments."""
    return call.module, list(fill_template(call.args, inputs))


SPECS = (
    OpSpec("module_call", (ModuleCallOp,), flops=measured_if_black_box, coupling=opaque_coupling,
           wraps=called_module),
)
