"""Ops that reduce or normalise over axes: mean, sum, amax, softmax, ..."""

from __future__ import annotations

from dagprune.ops.base import FunctionalOp, register_op_type

__all__ = ["ReductionOp", "SoftmaxOp", "AxisScanOp"]


def _all(*short_names: str) -> tuple[str, ...]:
    return tuple(f"{ns}.{name}" for name in short_names for ns in ("torch", "Tensor"))


@register_op_type
class ReductionOp(FunctionalOp):
    """Reduces over some axes (``dim``), keeping or dropping them (``keepdim``)."""

    function_names = _all("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm",
                          "logsumexp", "prod", "argmax", "argmin", "nanmean", "nansum", "all", "any") + (
        "torch.linalg.vector_norm", "torch.var_mean", "torch.std_mean")


@register_op_type
class SoftmaxOp(FunctionalOp):
    """Softmax-like normalisation along one axis."""

    function_names = _all("softmax", "log_softmax") + (
        "torch.nn.functional.softmax", "torch.nn.functional.log_softmax", "torch.special.softmax")


@register_op_type
class AxisScanOp(FunctionalOp):
    """Sorts, selects or accumulates along one axis (``dim``), keeping every axis: ``topk``,
    ``sort``, ``cumsum``, ``cummax``, ..."""

    function_names = _all("topk", "sort", "argsort", "msort", "cumsum", "cumprod", "cummax", "cummin",
                          "logcumsumexp")
