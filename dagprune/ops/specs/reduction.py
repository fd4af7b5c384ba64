"""Reductions (mean, sum, amax, ...), softmax, and sorts and scans along an axis (topk, cumsum, ...).

A mean, sum, 2-norm, variance or standard deviation over a channel axis (a hand-written layer
norm's ``x.mean(-1)`` and ``x.var(-1)``, a global response norm's ``x.mean(-1)``), and a maximum
or minimum over one (CBAM's spatial attention: ``x.max(1, keepdim=True)[0]``, ``x.amax(1)``) whose
indices nothing reads, *consumes* that axis' channels like a normalisation:
in the gated model it reduces over the kept channels only (the masking facet), so removing
them gives the same value. Other reductions over a channel axis, and reductions over several
channel axes at once, make those channels barriers. A softmax over a channel axis is consumed
the same way (removed channels get 0); a log-softmax or softmin over one is a barrier.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dagprune.ops.channel_map import along_axis, argument_value, normalize_dims, tensor_layout
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.reduction import AxisScanOp, ReductionOp, SoftmaxOp
from dagprune.ops.slicing import unchanged_removal
from dagprune.ops.spec import OpSpec, opaque_coupling

__all__ = ["SPECS"]

_SOFTMAX_LAYERS = (nn.Softmax, nn.LogSoftmax, nn.Softmin)


_NORMS = {"norm": "p", "vector_norm": "ord"}
"""2-norm reductions, by name, with the keyword of their order (given before ``dim``)."""
_SPREADS = {"var", "std", "var_mean", "std_mean"}
"""Variance-like reductions: ``(input, dim, unbiased, keepdim)`` or ``correction=`` by keyword."""
_EXTREMES = {"amax": math.inf, "max": math.inf, "amin": -math.inf, "min": -math.inf}
"""Maximum-like reductions, by name, with the sign of the value that removed channels lose to."""
_MASKABLE = {"mean", "sum", *_NORMS, *_SPREADS, *_EXTREMES}
"""Reductions whose value over kept channels the masking facet computes."""


def _reduction_arguments(module, values) -> tuple[list[int], bool]:
    """The reduced axes and ``keepdim`` of a reduction (a norm takes its order before ``dim``,
    a variance its ``unbiased`` flag before ``keepdim``)."""
    offset = 1 if module.short_name in _NORMS else 0
    dims = normalize_dims(argument_value(module, values, 1 + offset, "dim"), values[0].ndim)
    keepdim_position = 3 if module.short_name in _SPREADS else 2 + offset
    return dims, bool(argument_value(module, values, keepdim_position, "keepdim", False))


def _correction(module, values) -> float:
    """The variance's divisor correction: ``correction=``, else 1 unless ``unbiased=False``."""
    correction = argument_value(module, values, None, "correction")
    if correction is not None:
        return float(correction)
    return 1.0 if argument_value(module, values, 2, "unbiased", True) else 0.0


def _maskable(ctx, vertex, module, values) -> bool:
    """Whether the masking facet computes this call over kept channels: a mean, a sum, a
    2-norm, a variance or a maximum of a floating-point tensor (no ``dtype=`` or ``out=``
    conversions; a ``max(dim)`` whose indices nothing reads, since they count positions of the
    full axis)."""
    name = module.short_name
    if name not in _MASKABLE or not values[0].is_floating_point():
        return False
    if any(module.argument(None, keyword) is not None for keyword in ("dtype", "out")):
        return False
    if name in ("max", "min"):
        return argument_value(module, values, 1, "dim") is not None and not _indices_read(ctx, vertex)
    return name not in _NORMS or argument_value(module, values, 1, _NORMS[name], 2) in (2, 2.0, "fro", None)


def _indices_read(ctx, vertex) -> bool:
    """Whether a reader of ``vertex``'s ``(values, indices)`` result takes anything but the values."""
    for user in ctx.users.get(vertex, ()):
        module = user.module
        name = getattr(module, "function_name", None)
        picked = module.argument(1, None) if name in ("operator.getitem", "getattr") else None
        if picked not in (0, "values"):
            return True
    return False


def _is_tensor_tuple(output) -> bool:
    """Whether ``output`` is a ``(values, indices)``-style tuple of tensors."""
    return isinstance(output, tuple) and all(isinstance(item, torch.Tensor) for item in output)


def _per_output(layout, output):
    """``layout`` for a tensor result, or for each tensor of a ``(values, indices)`` result."""
    return tuple(layout for _ in output) if _is_tensor_tuple(output) else layout


def _has_tensor_result(values, output) -> bool:
    return isinstance(values[0], torch.Tensor) and (isinstance(output, torch.Tensor) or _is_tensor_tuple(output))


def reduction_coupling(ctx, vertex, module, layouts, values, output):
    """Channels on the kept axes pass (to both tensors of a ``max(dim)``-style ``(values,
    indices)`` result); a mean, sum or 2-norm over one channel axis consumes it; any other
    reduction over channels bars them."""
    if not _has_tensor_result(values, output):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    x_layout = tensor_layout(layouts[0])
    dims, keepdim = _reduction_arguments(module, values)
    reduced = [axis for axis in x_layout if axis in dims]
    consumed = reduced[0] if len(reduced) == 1 and _maskable(ctx, vertex, module, values) else None
    result = {}
    for axis, atoms in x_layout.items():
        if axis == consumed:
            ctx.consume(vertex, 0, axis, atoms, kind="norm")
        elif axis in dims:
            ctx.barrier(atoms, f"{module.short_name} over a channel axis")
        else:
            result[axis if keepdim else axis - sum(d < axis for d in dims)] = atoms
    return _per_output(result or None, output)


_SCAN_DIM_POSITION = {"topk": 2}  # topk(input, k, dim=-1); the others take dim first


def scan_coupling(ctx, vertex, module, layouts, values, output):
    """Rows along other axes are sorted, selected or accumulated independently: their channels
    pass; channels on the scanned axis itself are barriers (which ones a sort or top-k keeps
    depends on the data)."""
    if not _has_tensor_result(values, output):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    layout = tensor_layout(layouts[0])
    if module.short_name == "msort":
        dim = 0
    else:
        dim = argument_value(module, values, _SCAN_DIM_POSITION.get(module.short_name, 1), "dim", -1)
    dim %= max(values[0].ndim, 1)
    if dim in layout:
        ctx.barrier(layout[dim], f"{module.short_name} along a channel axis")
    return _per_output({axis: atoms for axis, atoms in layout.items() if axis != dim} or None, output)


def mask_reduction(op, inputs, mask, axis):
    """The mean, sum, 2-norm, variance or standard deviation over kept channels: channel ``c``
    of ``axis`` weighs ``mask[c]`` (a mean divides by the kept count times the other reduced
    sizes; a variance takes the weighted mean's squared deviations over that count less its
    correction)."""
    x = inputs[0]
    dims, keepdim = _reduction_arguments(op, inputs)
    weights = along_axis(mask, axis, x.ndim)
    if op.short_name in _NORMS:
        return ((x * x) * weights).sum(dims, keepdim=keepdim).sqrt()
    if op.short_name == "sum":
        return (x * weights).sum(dims, keepdim=keepdim)
    if op.short_name in _EXTREMES:  # removed channels lose: the dtype's lowest (highest) value
        info = torch.finfo(x.dtype)
        lost = info.min if _EXTREMES[op.short_name] > 0 else info.max
        return op(torch.where(weights > 0, x * weights, torch.full_like(x, lost)), *inputs[1:])
    count = mask.sum() * math.prod(x.shape[d] for d in dims if d != axis)
    mean = (x * weights).sum(dims, keepdim=True) / count
    if op.short_name == "mean":
        return mean if keepdim else mean.squeeze(dims)
    variance = ((x - mean).square() * weights).sum(dims, keepdim=keepdim) / (count - _correction(op, inputs))
    spread = variance.sqrt() if op.short_name.startswith("std") else variance
    if op.short_name.endswith("_mean"):
        return spread, (mean if keepdim else mean.squeeze(dims))
    return spread


def _softmax_dim(module, values) -> int | None:
    dim = module.dim if isinstance(module, _SOFTMAX_LAYERS) else argument_value(module, values, 1, "dim")
    return None if dim is None else dim % values[0].ndim


def _plain_softmax(module, values) -> bool:
    """A softmax (not its log, not softmin) of a floating-point tensor without a ``dtype=``."""
    if isinstance(module, _SOFTMAX_LAYERS):
        return type(module) is nn.Softmax
    return (module.short_name == "softmax" and values[0].is_floating_point()
            and argument_value(module, values, None, "dtype") is None)


def softmax_coupling(ctx, vertex, module, layouts, values, output):
    """Channels on other axes pass. A softmax over a channel axis (cross-covariance attention:
    XCiT, EdgeNeXt) consumes it like a norm (over the kept channels only, the removed ones
    giving 0) and its channels pass to the output; a log-softmax or softmin over one bars it."""
    dim = _softmax_dim(module, values)
    if dim is None:
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    x_layout = dict(tensor_layout(layouts[0]))
    if dim in x_layout and _plain_softmax(module, values):
        ctx.consume(vertex, 0, dim, x_layout[dim], kind="norm")
    elif dim in x_layout:
        ctx.barrier(x_layout.pop(dim), f"{describe_softmax(module)} over a channel axis")
    return x_layout or None


def describe_softmax(module) -> str:
    return type(module).__name__ if isinstance(module, _SOFTMAX_LAYERS) else module.short_name


def mask_softmax(op, inputs, mask, axis):
    """The softmax over kept channels: ``mask[c] * exp(x_c)`` normalised, 0 where a channel is
    removed."""
    x = inputs[0]
    weights = along_axis(mask, axis, x.ndim).to(x.dtype)
    scaled = (x - x.amax(axis, keepdim=True).detach()).exp() * weights
    return scaled / scaled.sum(axis, keepdim=True)


class _HandWrittenNorms(nn.Module):
    """A layer norm written out with means over the channel axis, and a 2-norm over it."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.up(x)
        centered = h - h.mean(-1, keepdim=True)
        h = centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = h / torch.norm(h, dim=-1, keepdim=True)
        spread = (h.var(-1, keepdim=True, unbiased=False) + 1e-5).sqrt()
        h = (h - h.mean(-1, keepdim=True)) / spread * h.std(-1)[..., None]
        variance, mean = torch.var_mean(h, dim=-1, keepdim=True, correction=0)
        h = (h - mean) / (variance + 1e-5).sqrt()
        extremes = h.amax(-1, keepdim=True) - torch.max(h, dim=2, keepdim=True)[0] + h.min(-1).values[..., None]
        h = h * torch.sigmoid(extremes)
        return self.down(h * torch.linalg.vector_norm(h, 2, dim=1, keepdim=True) / torch.linalg.vector_norm(h))


class _Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head, self.channel_softmax = nn.Conv2d(3, 8, 1), nn.Linear(8, 2), nn.Softmax(dim=1)

    def forward(self, x):
        x = self.conv(x)
        x = x * torch.softmax(x, dim=1) + self.channel_softmax(x)  # over the channels
        return self.head(x.mean((2, 3))).softmax(-1)


class _PooledByRanking(nn.Module):
    """Top-k pooling over positions, a running maximum over tokens, and a max over positions
    read by name from its ``(values, indices)`` result."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Linear(8 * 3, 2)

    def forward(self, x):
        y = self.conv(x).flatten(2)
        top = torch.topk(y, 2, dim=-1).values.sort(dim=-1).values
        peak = torch.cummax(y, dim=2).values.max(dim=2).values
        return self.head(torch.cat([top, peak[..., None]], -1).flatten(1))


SPECS = (
    OpSpec("reduction", (ReductionOp,), flops=no_flops, coupling=reduction_coupling,
           removal=unchanged_removal, masking=mask_reduction,
           example=lambda: (_HandWrittenNorms(), (torch.randn(2, 4, 5),))),
    OpSpec("softmax", (SoftmaxOp, *_SOFTMAX_LAYERS), flops=no_flops, coupling=softmax_coupling,
           removal=unchanged_removal, masking=mask_softmax, example=lambda: (_Pooled(), (torch.randn(1, 3, 4, 4),))),
    OpSpec("axis_scan", (AxisScanOp,), flops=no_flops, coupling=scan_coupling, removal=unchanged_removal,
           example=lambda: (_PooledByRanking(), (torch.randn(2, 3, 4, 4),))),
)
