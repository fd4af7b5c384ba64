"""Ops that move data around without arithmetic: reshape, permute, concat, split, indexing."""

from __future__ import annotations

from dagprune.ops.base import FunctionalOp, register_op_type

__all__ = ["ReshapeOp", "PermuteOp", "ConcatOp", "SplitOp", "GetItemOp", "ShapeQueryOp",
           "ExpandOp"]


def _both(*short_names: str) -> tuple[str, ...]:
    return tuple(f"{ns}.{name}" for name in short_names for ns in ("torch", "Tensor"))


@register_op_type
class ReshapeOp(FunctionalOp):
    """Changes the shape, keeping element order: view, reshape, flatten, (un)squeeze, ..."""

    function_names = _both("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                           "view_as", "reshape_as", "ravel")


@register_op_type
class ExpandOp(FunctionalOp):
    """Repeats data along axes: expand, expand_as, repeat, tile, broadcast_to."""

    function_names = _both("expand", "expand_as", "repeat", "tile", "broadcast_to",
                           "repeat_interleave")


@register_op_type
class PermuteOp(FunctionalOp):
    """Reorders axes: permute, transpose, t, swapaxes, movedim."""

    function_names = _both("permute", "transpose", "t", "swapaxes", "movedim", "moveaxis") + (
        "getattr.T", "getattr.mT")


@register_op_type
class ConcatOp(FunctionalOp):
    """Joins tensors along an axis: cat, concat, stack."""

    function_names = _both("cat", "concat", "concatenate", "stack")


@register_op_type
class SplitOp(FunctionalOp):
    """Cuts a tensor into a tuple of pieces along an axis: split, chunk, unbind, tensor_split."""

    function_names = _both("split", "chunk", "unbind", "tensor_split", "split_with_sizes")


@register_op_type
class GetItemOp(FunctionalOp):
    """Indexing ``x[...]``: picks an element of a tuple, or slices a tensor."""

    function_names = ("operator.getitem",)


@register_op_type
class ShapeQueryOp(FunctionalOp):
    """Reads shape metadata (``x.size(0)``, ``x.shape``, ``x.dim()``); returns Python values."""

    function_names = ("Tensor.size", "Tensor.dim", "Tensor.numel", "getattr", "len",
                      "Tensor.__len__")
