"""The vocabulary of channel maps, shared by the coupling facets of the op specs.

A *layout* describes where channels sit in a value: for a tensor, a dict mapping each axis
that carries channels to an integer array (one channel id, or *atom*, per position of that
axis); for a tuple or list, a tuple of layouts; for a Python int read from a tensor's shape, a
:class:`ShapeTag`. ``None`` means no channels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from dagprune.ops.templates import InputRef

__all__ = ["Layout", "ShapeTag", "FreeSize", "FREE_SIZE", "ChannelFreeMasks",
           "iter_layout_atoms", "is_size_layout", "tensor_layout",
           "argument_value", "argument_input", "normalize_dims", "channel_atoms",
           "broadcast_axes", "first_tensor_index", "barrier_all", "same_in_every_row",
           "tie_positions_across_groups"]

Layout = dict  # axis (non-negative int) -> np.ndarray of atom ids, for a tensor value


@dataclasses.dataclass
class ShapeTag:
    """The layout of a Python int read from a tensor's shape: the atoms of that axis.

    A size read at run time (``C = x.shape[2]``) and used to shape another tensor couples the
    two axes: after removal both must have the same number of kept channels.

    A size computed from one (``C // heads``) has ``sources``, the atoms of the axis it was
    computed from: it only says how long the axis it shapes is (a reshape rewrites such a size
    to the kept count at removal), so it is never unified with another axis, and where it is
    used in a way not followed, all of its sources are barred.
    """

    atoms: np.ndarray
    sources: np.ndarray | None = None

    @property
    def is_derived(self) -> bool:
        return self.sources is not None

    @property
    def all_atoms(self) -> np.ndarray:
        """The atoms a barrier on this size must bar."""
        return self.atoms if self.sources is None else self.sources


class FreeSize:
    """The layout of a Python int built only from sizes of axes that carry no channels (the
    batch, tokens, pixels) and constants: removal never changes it, so a reshape may keep it as
    a run-time size where it sits beside channels (``q.view(T, B * heads, dim)``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FREE_SIZE"


FREE_SIZE = FreeSize()


class ChannelFreeMasks(dict):
    """The (empty) removal masks of a :class:`FreeSize` input: a removal facet may keep that
    size as it is computed at run time."""


def iter_layout_atoms(layout: Any):
    """Yields every atom array in a (possibly nested) layout.

    >>> [a.tolist() for a in iter_layout_atoms(({1: np.arange(2)}, ShapeTag(np.arange(3))))]
    [[0, 1], [0, 1, 2]]
    """
    if isinstance(layout, dict):
        yield from layout.values()
    elif isinstance(layout, ShapeTag):
        yield layout.all_atoms
    elif isinstance(layout, (tuple, list)):
        for item in layout:
            yield from iter_layout_atoms(item)


def is_size_layout(layout: Any) -> bool:
    """Whether ``layout`` is a size (or a shape tuple holding a size) read from a channel axis."""
    if isinstance(layout, ShapeTag):
        return True
    return isinstance(layout, tuple) and any(isinstance(item, ShapeTag) for item in layout)


def tensor_layout(layout: Any) -> Layout:
    """``layout`` if it is a tensor's layout, else the empty layout."""
    return layout if isinstance(layout, dict) else {}


def argument_value(module, values: list, position: int | None, keyword: str | None,
                   default=None):
    """The value of a functional op's argument: a constant, or the input it refers to."""
    argument = module.argument(position, keyword, default)
    return values[argument.index] if isinstance(argument, InputRef) else argument


def constant_argument(module, position: int | None, keyword: str | None, default=None):
    """A functional op's argument when it is a constant, None when it is computed at run time
    (an input of the op)."""
    value = module.argument(position, keyword, default)
    return None if isinstance(value, InputRef) else value


def along_axis(mask: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """A per-channel ``mask`` shaped to broadcast along ``axis`` of an ``ndim``-axis tensor."""
    return mask.reshape([-1 if a == axis else 1 for a in range(ndim)])


def argument_input(module, position: int | None, keyword: str | None) -> int | None:
    """The index of the input passed as a functional op's argument, or None for a constant."""
    argument = module.argument(position, keyword)
    return argument.index if isinstance(argument, InputRef) else None


def normalize_dims(dims, ndim: int) -> list[int]:
    """``dims`` (None, an int or a sequence, possibly negative) as non-negative axes.

    >>> normalize_dims(-1, 3), normalize_dims(None, 2)
    ([2], [0, 1])
    """
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return [d % ndim for d in dims]


def first_tensor_index(values: list) -> int | None:
    """The index of the first tensor among ``values``, or None."""
    return next((i for i, v in enumerate(values) if isinstance(v, torch.Tensor)), None)


def channel_atoms(ctx, layout: Layout, reason: str) -> np.ndarray | None:
    """The atoms of axis 1 (channels, NC... layout); atoms on any other axis become barriers."""
    for axis, atoms in layout.items():
        if axis != 1:
            ctx.barrier(atoms, reason)
    return layout.get(1)


def broadcast_axes(ctx, tensors: list[tuple[Layout, torch.Tensor]], output_shape: torch.Size,
                   reason: str) -> Layout:
    """Couples the non-broadcast axes of several tensors combined elementwise.

    An axis tracked in some operands and untracked (or broadcast from 1) in others is a barrier:
    removing its channels would change the untracked operand's meaning.
    """
    out_ndim = len(output_shape)
    result: Layout = {}
    for axis in range(out_ndim):
        participants = []
        for layout, value in tensors:
            input_axis = axis - (out_ndim - value.ndim)
            if input_axis >= 0 and value.shape[input_axis] == output_shape[axis] and output_shape[axis] > 1:
                participants.append(layout.get(input_axis))
        tracked = [atoms for atoms in participants if atoms is not None]
        if not tracked:
            continue
        if len(tracked) < len(participants):
            for atoms in tracked:
                ctx.barrier(atoms, reason)
            continue
        for atoms in tracked[1:]:
            ctx.unify(tracked[0], atoms)
        result[axis] = tracked[0]
    return result


def barrier_all(ctx, layouts: Any, reason: str) -> None:
    """Makes every channel reaching an op a barrier (the op is opaque for these inputs)."""
    ctx.barrier_layout(layouts, reason)
    return None


def operand_layout(ctx, vertex, layouts: list, index: int) -> Layout:
    """The tensor layout of input ``index``; every other input's channels are barriers (an
    op whose extra operands, weights or constants, must not carry channels)."""
    for other_index, other in enumerate(layouts):
        if other_index != index:
            ctx.barrier_layout(other, f"extra operand of vertex {vertex.name}")
    return tensor_layout(layouts[index])


def axis_atoms(ctx, layout: Layout, axis: int, reason: str) -> np.ndarray | None:
    """The atoms of ``layout`` on ``axis`` (None when it has none); its channels on any other
    axis are barriers, with ``reason`` naming the axis (``{axis}`` is filled in)."""
    for other_axis, atoms in layout.items():
        if other_axis != axis:
            ctx.barrier(atoms, reason.format(axis=other_axis))
    return layout.get(axis)


def same_in_every_row(rows) -> bool:
    """Whether every row of ``rows`` (one per group: its atoms, classes or kept flags) equals
    the first.

    >>> same_in_every_row(np.array([[1, 0], [1, 0]])), same_in_every_row(np.array([[1, 0], [0, 1]]))
    (True, False)
    """
    rows = np.asarray(rows)
    return bool((rows == rows[:1]).all())


def whole_in_every_row(rows) -> bool:
    """Whether every row of ``rows`` (one per group: its classes) holds a single value, i.e.
    each group is kept or removed whole.

    >>> whole_in_every_row(np.array([[3, 3], [5, 5]])), whole_in_every_row(np.array([[3, 5], [3, 5]]))
    (True, False)
    """
    rows = np.asarray(rows)
    return bool((rows == rows[:, :1]).all())


def tie_positions_across_groups(ctx, rows: np.ndarray) -> None:
    """Unifies each position of every group's atoms (one row per group) with the same position
    of the first group: every group keeps the same positions, so the number of groups stays."""
    rows = np.asarray(rows)
    if len(rows) > 1:
        ctx.unify(rows[1:], np.broadcast_to(rows[:1], rows[1:].shape))
