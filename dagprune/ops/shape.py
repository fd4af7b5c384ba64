"""Ops that move data around without arithmetic: reshape, permute, concat, split, indexing."""

from __future__ import annotations

from dagprune.ops.base import FunctionalOp, register_op_type

__all__ = ["ReshapeOp", "PermuteOp", "ConcatOp", "SplitOp", "GetItemOp", "ShapeQueryOp",
           "ExpandOp"]


def _both(*short_names: str) -> tuple[str, ...]:
    return tuple(f"{ns}.{name}" for name in short_names for ns in ("torch", "Tensor"))


@register_op_type
class ReshapeOp(FunctionalOp):
    """Changes the shape, keeping element order: view, reshape, flatten, (un)squeeze, ...

    ``size_overrides``: ``(axis, size)`` pairs replacing entries of a whole shape tuple computed
    at run time (``x.view(x.size()[:-1] + (heads, dim))``) before the call; channel removal sets
    them to the kept counts of the axes that lost channels.
    """

    function_names = _both("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                           "view_as", "reshape_as", "ravel")

    def __init__(self, function_name: str, args: tuple = (), kwargs: dict | None = None,
                 size_overrides: tuple = ()):
        super().__init__(function_name, args, kwargs)
        self.size_overrides = tuple((int(axis), int(size)) for axis, size in size_overrides)

    def forward(self, *inputs):
        if self.size_overrides:
            inputs = self._overridden(inputs)
        return super().forward(*inputs)

    def _overridden(self, inputs: tuple) -> list:
        index = self.argument(1, "shape" if self.short_name == "reshape" else "size").index
        sizes = list(inputs[index])
        for axis, size in self.size_overrides:
            sizes[axis] = size
        return [tuple(sizes) if i == index else value for i, value in enumerate(inputs)]

    def extra_repr(self) -> str:
        overrides = f", size_overrides={self.size_overrides}" if self.size_overrides else ""
        return super().extra_repr() + overrides

    def get_config(self) -> dict:
        config = super().get_config()
        if self.size_overrides:
            config["size_overrides"] = [list(pair) for pair in self.size_overrides]
        return config

    @classmethod
    def from_config(cls, config: dict) -> "ReshapeOp":
        op = super().from_config(config)
        op.size_overrides = tuple((int(axis), int(size)) for axis, size in config.get("size_overrides", ()))
        return op


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
