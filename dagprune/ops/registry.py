"""The default op registry: dagprune's own specs, extended by users with :func:`register_op`."""

from __future__ import annotations

from typing import Any

from torch import nn

from dagprune.ops.flop_counting import measured_flops, measured_if_black_box
from dagprune.ops.spec import OpRegistry, OpSpec
from dagprune.ops.specs import builtin_specs

__all__ = ["OPS", "register_op", "spec_for", "op_flops"]

OPS = OpRegistry(builtin_specs())
"""Specs of every op dagprune knows; ``nn.Module`` (a black box) and ``FunctionalOp`` (a
function with no spec of its own) are the fallbacks, so every op has a spec."""

_MEASURING = (measured_flops, measured_if_black_box)


def register_op(spec: OpSpec, replace: bool = False) -> OpSpec:
    """Adds ``spec`` to the default registry (see :meth:`OpRegistry.register`).

    >>> from torch import nn
    >>> from dagprune.ops import OpSpec, opaque_coupling
    >>> class Scale(nn.Module):
    ...     def forward(self, x):
    ...         return 2 * x
    >>> spec = register_op(OpSpec("doc_scale", (Scale,), flops=lambda m, i, o: 0,
    ...                           coupling=opaque_coupling))
    >>> spec_for(Scale()).name
    'doc_scale'
    """
    return OPS.register(spec, replace=replace)


def spec_for(module: nn.Module) -> OpSpec:
    """The spec of ``module`` in the default registry (a fallback when it has none of its own)."""
    return OPS.lookup(module)


def op_flops(module: nn.Module, inputs: list, output: Any, registry: OpRegistry = OPS) -> int:
    """FLOPs of one call of ``module`` on ``inputs``, by its spec's flops facet.

    An op that wraps another (a leaf module called with constant arguments) counts the inner
    op's FLOPs, unless those are measured: then the whole call is measured, keywords included.
    """
    spec = registry.lookup(module)
    if spec.wraps is not None:
        inner, inner_inputs = spec.wraps(module, inputs)
        inner_spec = registry.lookup(inner)
        if inner_spec.flops not in _MEASURING:
            return int(inner_spec.flops(inner, inner_inputs, output))
    return int(spec.flops(module, inputs, output))
