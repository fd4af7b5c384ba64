"""Ops that move channels without arithmetic: permute, concatenation, split, indexing,
shape queries, and im2col / col2im (unfold / fold)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from dagprune.ops.channel_map import (FREE_SIZE, Layout, ShapeTag, argument_input, argument_value,
                                      barrier_all, channel_atoms, is_size_layout, tensor_layout)
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.shape import ConcatOp, GetItemOp, PermuteOp, ShapeQueryOp, SplitOp
from dagprune.ops.slicing import kept_count, unchanged_removal
from dagprune.ops.spec import OpSpec
from dagprune.ops.templates import InputRef

__all__ = ["SPECS", "TENSOR_ATTRIBUTES"]


TENSOR_ATTRIBUTES = ("data", "real", "T", "mT")
"""Attributes read with ``getattr`` that are tensors: the same values, or their axes reversed
(``T``) or the last two swapped (``mT``)."""


_RESULT_FIELDS = ("values", "indices")
"""The fields of the named tuples torch's ``max(dim)``, ``topk``, ``sort``, ... return."""


def _is_values_and_indices(value) -> bool:
    return isinstance(value, tuple) and type(value).__module__ == "torch.return_types" and len(value) == 2


def _attribute_layout(attribute: str, layout: dict, ndim: int) -> dict | None:
    """The layout of ``x.<attribute>`` for a tensor attribute (see :data:`TENSOR_ATTRIBUTES`)."""
    if attribute == "T":
        return {ndim - 1 - axis: atoms for axis, atoms in layout.items()}
    if attribute == "mT":
        swap = {ndim - 1: ndim - 2, ndim - 2: ndim - 1}
        return {swap.get(axis, axis): atoms for axis, atoms in layout.items()}
    return dict(layout)


def shape_query_coupling(ctx, vertex, module, layouts, values, output):
    """Sizes read from channel axes carry those axes' atoms (see :class:`ShapeTag`)."""
    name = module.short_name
    if name == "getattr" and module.argument(1, None) in _RESULT_FIELDS and \
            _is_values_and_indices(values[0]) and isinstance(layouts[0], tuple):
        return layouts[0][_RESULT_FIELDS.index(module.argument(1, None))]
    layout = tensor_layout(layouts[0]) if layouts else {}
    if not isinstance(values[0], torch.Tensor):
        return None

    def tag(axis):
        return ShapeTag(layout[axis]) if axis in layout else FREE_SIZE

    if name == "getattr" and module.argument(1, None) in TENSOR_ATTRIBUTES:
        return _attribute_layout(module.argument(1, None), layout, values[0].ndim)
    if name == "getattr" and module.argument(1, None) == "shape" or (
            name == "size" and argument_value(module, values, 1, "dim") is None):
        return tuple(tag(axis) for axis in range(values[0].ndim))
    if name == "size":
        return tag(argument_value(module, values, 1, "dim") % values[0].ndim)
    if name in ("len", "__len__"):
        return tag(0)
    if name == "numel" and layout:
        ctx.barrier_layout(layout, "numel of a channel-tracked tensor")
    return None


def _permutation(module, values, ndim) -> list[int] | None:
    name = module.short_name
    if name in ("permute",):
        dims = [a for a in module.args[1:]] if len(module.args) > 2 or not isinstance(
            module.argument(1, "dims"), (tuple, list)) else list(module.argument(1, "dims"))
        if any(not isinstance(d, int) for d in dims):
            return None
        return [d % ndim for d in dims]
    if name in ("transpose", "swapaxes"):
        first, second = module.argument(1, "dim0"), module.argument(2, "dim1")
        if not isinstance(first, int) or not isinstance(second, int):
            return None
        order = list(range(ndim))
        order[first % ndim], order[second % ndim] = order[second % ndim], order[first % ndim]
        return order
    if name == "t":
        return list(range(ndim))[::-1]
    if name in ("movedim", "moveaxis"):
        source, destination = module.argument(1, "source"), module.argument(2, "destination")
        if not isinstance(source, int) or not isinstance(destination, int):
            return None
        order = list(range(ndim))
        order.insert(destination % ndim, order.pop(source % ndim))
        return order
    return None


def permute_coupling(ctx, vertex, module, layouts, values, output):
    layout = tensor_layout(layouts[0])
    order = _permutation(module, values, values[0].ndim)
    if order is None:
        return barrier_all(ctx, layouts, f"{module.function_name} with dynamic axes")
    return {new: layout[old] for new, old in enumerate(order) if old in layout} or None


def concat_coupling(ctx, vertex, module, layouts, values, output):
    tensors = module.argument(0, "tensors")
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, InputRef) for t in tensors):
        return barrier_all(ctx, layouts, "concatenation of a computed list")
    dim = argument_value(module, values, 1, "dim", 0)
    parts = [(tensor_layout(layouts[t.index]), values[t.index]) for t in tensors]
    stacking = module.short_name == "stack"
    ndim = output.ndim
    dim %= ndim
    result = {}
    if not stacking:
        pieces = [layout.get(dim) for layout, _ in parts]
        if any(piece is not None for piece in pieces):
            filled = []
            for piece, (_, value) in zip(pieces, parts):
                if piece is None:
                    piece = ctx.fresh(value.shape[dim])
                    ctx.barrier(piece, "concatenated with an untracked tensor")
                filled.append(piece)
            result[dim] = np.concatenate(filled)
    for axis in range(ndim):
        if axis == dim:
            continue
        source_axis = axis if not stacking or axis < dim else axis - 1
        tracked = [layout.get(source_axis) for layout, _ in parts]
        present = [atoms for atoms in tracked if atoms is not None]
        if not present:
            continue
        if len(present) < len(tracked):
            for atoms in present:
                ctx.barrier(atoms, "concatenated beside an untracked tensor")
            continue
        for atoms in present[1:]:
            ctx.unify(present[0], atoms)
        result[axis] = present[0]
    return result or None


def split_coupling(ctx, vertex, module, layouts, values, output):
    layout = tensor_layout(layouts[0])
    if not isinstance(output, (tuple, list)):
        return barrier_all(ctx, layouts, "split without a tuple result")
    ndim = values[0].ndim
    dim_position = 1 if module.short_name == "unbind" else 2
    dim = argument_value(module, values, dim_position, "dim", 0) % ndim
    _couple_split_sizes(ctx, module, layouts, layout.get(dim))
    pieces = []
    start = 0
    for piece in output:
        size = 1 if module.short_name == "unbind" else piece.shape[dim]
        piece_layout = {}
        for axis, atoms in layout.items():
            if axis == dim:
                if module.short_name == "unbind":
                    ctx.barrier(atoms, "unbind of a channel axis")
                    continue
                piece_layout[axis] = atoms[start:start + size]
            else:
                piece_layout[axis - 1 if module.short_name == "unbind" and axis > dim else axis] = atoms
        pieces.append(piece_layout or None)
        start += size
    return tuple(pieces)


def _couple_split_sizes(ctx, module, layouts: list, atoms: np.ndarray | None) -> None:
    """``torch.split(x, x.shape[d] // k, d)`` (GPT-J's sines and cosines): ``k`` equal blocks
    of the split axis, tied position by position, so removal keeps them equal (it writes the
    kept counts in). Any other size read from a channel axis is barred."""
    size = module.argument(1, None)
    tag = layouts[size.index] if isinstance(size, InputRef) else None
    sizes = [layout for index, layout in enumerate(layouts) if index and is_size_layout(layout)]
    if len(sizes) == 1 and sizes[0] is tag and _tied_blocks(ctx, tag, atoms) is not None:
        return
    for layout in sizes:
        ctx.barrier_layout(layout, f"channel count used by {module.function_name}")


def getitem_coupling(ctx, vertex, module, layouts, values, output):
    container, index = values[0], argument_value(module, values, 1, None)
    layout = layouts[0]
    if not isinstance(container, torch.Tensor):
        if isinstance(container, (tuple, list)) and isinstance(index, int) and isinstance(layout, (tuple, list)):
            return layout[index]
        if isinstance(layout, (tuple, list)) and isinstance(index, slice):
            return type(layout)(layout[index])
        return None
    layout = tensor_layout(layout)
    if isinstance(index, torch.Tensor) and not index.dtype.is_floating_point and index.dtype != torch.bool:
        return _gather_rows(ctx, layouts, layout, index)
    items = index if isinstance(index, tuple) else (index,)
    # tensors (or ints) computed in the graph; a slice's run-time bounds stay holes
    items = tuple(values[item.index] if isinstance(item, InputRef) else item for item in items)
    if any(isinstance(item, torch.Tensor) for item in items):
        return _advanced_index(ctx, layouts, layout, container, list(items))
    if any(isinstance(item, (list, InputRef)) for item in items):
        return barrier_all(ctx, layouts, "advanced indexing")
    explicit = sum(1 for item in items if item is not None and item is not Ellipsis)
    result, in_axis, out_axis = {}, 0, 0
    for item in items:
        if item is Ellipsis:
            skipped = container.ndim - explicit
            for _ in range(skipped):
                if in_axis in layout:
                    result[out_axis] = layout[in_axis]
                in_axis, out_axis = in_axis + 1, out_axis + 1
        elif item is None:
            out_axis += 1
        elif isinstance(item, int):
            if in_axis in layout:
                ctx.barrier(layout[in_axis], "integer index into a channel axis")
            in_axis += 1
        elif isinstance(item, slice):
            if in_axis in layout:
                if _has_run_time_bound(item):
                    picked = _run_time_fraction(ctx, layouts, layout[in_axis], item)
                    if picked is not None:
                        result[out_axis] = picked
                elif item.step not in (None, 1):
                    picked = _strided_channels(ctx, layout[in_axis], item)
                    if picked is not None:
                        result[out_axis] = picked
                else:
                    result[out_axis] = layout[in_axis][item]
            in_axis, out_axis = in_axis + 1, out_axis + 1
        else:
            return barrier_all(ctx, layouts, f"index {item!r}")
    while in_axis < container.ndim:
        if in_axis in layout:
            result[out_axis] = layout[in_axis]
        in_axis, out_axis = in_axis + 1, out_axis + 1
    return result or None


def _has_run_time_bound(item: slice) -> bool:
    return any(bound is not None and not isinstance(bound, int) for bound in (item.start, item.stop, item.step))


def _run_time_fraction(ctx, layouts: list, atoms: np.ndarray, item: slice) -> np.ndarray | None:
    """A channel axis cut at a size read at run time, ``x[..., :n]`` or ``x[..., n:]``:

    * ``n = y.shape[-1]``, another axis' count (partial rotary embeddings' ``q[..., :rot]``
      with ``rot = cos.shape[-1]``): the first ``n`` channels are that axis' channels, so the
      slim tensor's ``n'`` still cuts after the kept ones among them;
    * ``n = x.shape[-1] // k`` (``rotate_half``): the axis is cut into ``k`` blocks whose
      channels are tied position by position, so ``n' // k`` still cuts at a block boundary.

    Any other run-time bound bars the axis (None), a size that carries no channels too (it may
    follow the input's sizes)."""
    bound = item.stop if item.start is None else item.start
    tag = layouts[bound.index] if isinstance(bound, InputRef) and item.step is None \
        and (item.start is None or item.stop is None) else None
    if isinstance(tag, ShapeTag) and not tag.is_derived and 0 < len(tag.atoms) <= len(atoms):
        cut = len(tag.atoms)
        ctx.unify(atoms[:cut], tag.atoms)
        return atoms[:cut].copy() if item.start is None else atoms[cut:].copy()
    blocks = _tied_blocks(ctx, tag, atoms)
    if blocks is None:
        ctx.barrier(atoms, "slice of a channel axis with run-time bounds")
        return None
    return blocks[0].copy() if item.start is None else blocks[1:].reshape(-1).copy()


def _tied_blocks(ctx, tag, atoms: np.ndarray) -> np.ndarray | None:
    """Where ``tag`` is ``n // k`` of the axis holding ``atoms`` (``n = x.shape[d]``): the axis
    as ``k`` rows of ``n // k`` atoms, tied position by position, so that ``n' // k`` of the
    slim axis still cuts it at a block boundary. None for any other tag (nothing tied)."""
    if not (isinstance(tag, ShapeTag) and tag.is_derived and np.array_equal(tag.sources, atoms)
            and len(tag.atoms) and len(atoms) % len(tag.atoms) == 0):
        return None
    blocks = np.asarray(atoms).reshape(-1, len(tag.atoms))
    ctx.unify(blocks[1:], np.broadcast_to(blocks[:1], blocks[1:].shape))
    return blocks


def _strided_channels(ctx, atoms: np.ndarray, item: slice) -> np.ndarray | None:
    """``x[..., s::k]`` along a channel axis of a multiple of ``k`` channels, ``0 <= s < k``
    (interleaved rotary embeddings take ``x[..., ::2]`` and ``x[..., 1::2]``): each block of
    ``k`` consecutive channels is one class, kept or removed whole, so the same slice of the slim
    tensor picks the same channels. Any other strided slice bars the axis (None)."""
    step, start = item.step, item.start or 0
    if step < 1 or not 0 <= start < step or len(atoms) % step or item.stop not in (None, len(atoms)):
        ctx.barrier(atoms, "strided slice of a channel axis")
        return None
    blocks = np.asarray(atoms).reshape(-1, step)
    ctx.unify(blocks[:, 1:], np.repeat(blocks[:, :1], step - 1, axis=1))
    return blocks[:, start].copy()


def _is_integer_index(item) -> bool:
    return isinstance(item, int) and not isinstance(item, bool) or isinstance(item, torch.Tensor) and not (
        item.dtype == torch.bool or item.dtype.is_floating_point or item.dtype.is_complex)


def _advanced_index(ctx, layouts: list, layout: Layout, container: torch.Tensor, items: list) -> Layout | None:
    """``x[torch.arange(B), positions]`` (a token picked per sequence: CLIP's pooled text,
    sequence classification): integer tensors (and ints beside them) index some axes, whole
    slices keep the others and their channels, placed as torch places them (behind the index's
    axes, or in place when the indexed axes are adjacent). Channels of an indexed axis, of a
    partly sliced axis, or used as an index are barred; so is every other form (boolean masks,
    ``None``)."""
    if items.count(Ellipsis) > 1 or any(not (item is Ellipsis or isinstance(item, slice) or _is_integer_index(item))
                                        for item in items):
        return barrier_all(ctx, layouts, "advanced indexing")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (container.ndim - len(items) + 1)
    items += [slice(None)] * (container.ndim - len(items))
    indexed = [axis for axis, item in enumerate(items) if not isinstance(item, slice)]
    index_ndim = max(items[axis].ndim if isinstance(items[axis], torch.Tensor) else 0 for axis in indexed)
    kept = [axis for axis, item in enumerate(items) if isinstance(item, slice)]
    in_place = indexed == list(range(indexed[0], indexed[-1] + 1))
    position = {axis: rank + (index_ndim if not in_place or axis > indexed[0] else 0)
                for rank, axis in enumerate(kept)}
    for other in layouts[1:]:
        ctx.barrier_layout(other, "a channel axis used as an index")
    result = {}
    for axis, atoms in layout.items():
        if axis in indexed or items[axis] != slice(None):
            ctx.barrier(atoms, "a channel axis indexed beside advanced indexing")
        else:
            result[position[axis]] = atoms
    return result or None


def _gather_rows(ctx, layouts: list, layout: Layout, index: torch.Tensor) -> Layout | None:
    """``x[index]`` with an integer tensor: rows of axis 0 are gathered (a relative position
    table indexed by pair), the other axes keep their channels, shifted behind the index's axes."""
    for other in layouts[1:]:
        ctx.barrier_layout(other, "a channel axis used as an index")
    if 0 in layout:
        ctx.barrier(layout[0], "rows of a channel axis gathered by an index")
    return {axis - 1 + index.ndim: atoms for axis, atoms in layout.items() if axis > 0} or None


def _image_channels(ctx, module, layouts, values, output, dims: tuple[int, int], what: str):
    """The channel atoms (axis 1) of the image input of unfold (``dims`` 4 -> 3) or fold (3 ->
    4), or None after making every channel a barrier."""
    is_module = isinstance(module, (nn.Unfold, nn.Fold))
    x_index = 0 if is_module else argument_input(module, 0, "input")
    if x_index is None or values[x_index].ndim != dims[0] or output.ndim != dims[1]:
        return barrier_all(ctx, layouts, f"{what} of an unbatched or constant input")
    return channel_atoms(ctx, tensor_layout(layouts[x_index]), f"{what} over a channel-tracked axis")


def unfold_coupling(ctx, vertex, module, layouts, values, output):
    """im2col: output channel ``c * k*k + p`` is input channel ``c`` at kernel position ``p``."""
    atoms = _image_channels(ctx, module, layouts, values, output, (4, 3), "unfold")
    if atoms is None:
        return None
    return {1: np.repeat(atoms, output.shape[1] // len(atoms))}


def fold_coupling(ctx, vertex, module, layouts, values, output):
    """col2im: output channel ``c`` sums input channels ``c * k*k`` to ``c * k*k + k*k - 1``."""
    atoms = _image_channels(ctx, module, layouts, values, output, (3, 4), "fold")
    if atoms is None:
        return None
    per_channel = atoms.reshape(output.shape[1], -1)
    for summed in per_channel:  # summed together: kept or removed together
        ctx.tie(summed)
    return {1: np.ascontiguousarray(per_channel[:, 0])}


def remove_from_split(module, input_masks, output_mask, shapes):
    if module.short_name == "unbind":  # never unbinds a channel axis (a barrier): same op works;
        return copy.deepcopy(module)   # rewriting it as split would keep the unbound axis
    ndim = len(shapes[0])
    dim_position = 1 if module.short_name == "unbind" else 2
    dim = module.argument(dim_position, "dim", 0) % ndim
    if all(piece.get(dim) is None for piece in output_mask):  # not a channel axis: sizes may vary
        return copy.deepcopy(module)
    pieces = [kept_count(piece.get(dim), shape[dim]) for piece, shape in zip(output_mask, shapes[-1])]
    namespace = "Tensor" if module.function_name.startswith("Tensor.") else "torch"
    return SplitOp(f"{namespace}.split", (module.args[0], pieces), {"dim": dim})


def remove_from_getitem(module, input_masks, output_mask, shapes):
    module = copy.deepcopy(module)
    in_masks = input_masks[0]
    if not isinstance(in_masks, dict) or not in_masks:
        return module
    index = module.argument(1, None)
    items = list(index) if isinstance(index, tuple) else [index]
    ndim = len(shapes[0])
    explicit = sum(1 for item in items if item is not None and item is not Ellipsis)
    in_axis, rewritten = 0, []
    for item in items:
        if item is Ellipsis:
            in_axis += ndim - explicit
        elif isinstance(item, slice):
            mask = in_masks.get(in_axis)
            if mask is not None and item.step not in (None, 1):  # whole blocks go: same offset
                item = slice(item.start, None, item.step)
            elif mask is not None and not _has_run_time_bound(item):  # else a fraction of the slim size
                start, stop, _ = item.indices(len(mask))
                item = slice(int(mask[:start].sum()), int(mask[:stop].sum()), None)
            in_axis += 1
        elif isinstance(item, (int, InputRef)):  # an integer, or an index computed in the graph
            in_axis += 1
        rewritten.append(item)
    module.set_argument(1, None, tuple(rewritten) if isinstance(index, tuple) else rewritten[0])
    return module


class _Indexing(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        joined = torch.cat([self.a(x), self.b(x)], dim=1)
        first, second = joined.split([5, 5], dim=1)
        picked = (first + second)[:, 1:5]
        return self.head(picked.permute(0, 1, 3, 2).reshape(x.shape[0], picked.size(1), x.shape[2], -1))


class _Unfolded(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fold, self.head = nn.Conv2d(3, 4, 1), nn.Fold((4, 4), 2, stride=2), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.fold(torch.nn.functional.unfold(self.conv(x), 2, stride=2)))


def _example(model_class, shape):
    return lambda: (model_class(), (torch.randn(*shape),))


SPECS = (
    OpSpec("shape_query", (ShapeQueryOp,), flops=no_flops, coupling=shape_query_coupling,
           removal=unchanged_removal, example=_example(_Indexing, (1, 3, 4, 4))),
    OpSpec("permute", (PermuteOp,), flops=no_flops, coupling=permute_coupling,
           removal=unchanged_removal, example=_example(_Indexing, (1, 3, 4, 4))),
    OpSpec("concat", (ConcatOp,), flops=no_flops, coupling=concat_coupling,
           removal=unchanged_removal, example=_example(_Indexing, (1, 3, 4, 4))),
    OpSpec("split", (SplitOp,), flops=no_flops, coupling=split_coupling,
           removal=remove_from_split, reads_sizes=True, example=_example(_Indexing, (1, 3, 4, 4))),
    OpSpec("getitem", (GetItemOp,), flops=no_flops, coupling=getitem_coupling,
           removal=remove_from_getitem, reads_sizes=True, example=_example(_Indexing, (1, 3, 4, 4))),
    # im2col / col2im hold no per-channel state; their sizes are spatial
    OpSpec("unfold", (nn.Unfold, "torch.nn.functional.unfold"), flops=no_flops,
           coupling=unfold_coupling, removal=unchanged_removal, example=_example(_Unfolded, (1, 3, 4, 4))),
    OpSpec("fold", (nn.Fold, "torch.nn.functional.fold"), flops=no_flops,
           coupling=fold_coupling, removal=unchanged_removal, example=_example(_Unfolded, (1, 3, 4, 4))),
)
