"""The op specs dagprune ships, one file per family of ops (see :mod:`dagprune.ops.spec`)."""

from __future__ import annotations

from dagprune.ops.spec import OpSpec
from dagprune.ops.specs import (attention, calls, channelwise, cond_conv, convolution, einsum, elementwise,
                                embedding, evo_norm, factories, functional_conv, glu, grouped_mm, indexing, leaves,
                                linear, normalization, padding, pixel_shuffle, positional, products, recurrent,
                                recurrent_cells, reduction, reshape, rms_norm, selection)

__all__ = ["builtin_specs"]

_FAMILIES = (convolution, functional_conv, cond_conv, linear, embedding, normalization, rms_norm, evo_norm,
             channelwise, padding, elementwise, glu, factories, reduction, products, grouped_mm, einsum, reshape,
             positional, pixel_shuffle, indexing, selection, recurrent_cells, recurrent, attention, calls, leaves)


def builtin_specs() -> tuple[OpSpec, ...]:
    """Every spec dagprune ships, in a fixed order."""
    return tuple(spec for family in _FAMILIES for spec in family.SPECS)
