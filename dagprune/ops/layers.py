"""Functional forms of layers: F.conv2d, F.linear, norms, pooling, padding, interpolation."""

from __future__ import annotations

from dagprune.ops.base import FunctionalOp, register_op_type

__all__ = ["FunctionalLayerOp", "PoolOp", "InterpolateOp", "PadOp", "NormOp"]

_F = "torch.nn.functional."


@register_op_type
class FunctionalLayerOp(FunctionalOp):
    """A functional layer whose weights are inputs: F.conv*, F.linear."""

    function_names = tuple(_F + name for name in ("conv1d", "conv2d", "conv3d", "linear",
                                                   "conv_transpose1d", "conv_transpose2d")) + (
        "torch.conv2d", "torch.conv1d", "torch.conv3d", "torch.addmm")


@register_op_type
class NormOp(FunctionalOp):
    """Functional normalisation: F.layer_norm, F.group_norm, F.batch_norm, F.normalize, ..."""

    function_names = tuple(_F + name for name in ("layer_norm", "group_norm", "batch_norm",
                                                   "instance_norm", "normalize", "rms_norm")) + (
        "torch.layer_norm", "torch.group_norm", "torch.batch_norm", "torch.rms_norm")


@register_op_type
class PoolOp(FunctionalOp):
    """Spatial pooling applied per channel."""

    function_names = tuple(_F + name for name in (
        "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d",
        "lp_pool2d")) + ("torch.avg_pool1d", "torch.max_pool2d", "torch.adaptive_avg_pool1d",
                         "torch.max_pool1d")


@register_op_type
class InterpolateOp(FunctionalOp):
    """Spatial resampling: F.interpolate, F.upsample, pixel (un)shuffle keeps its own family."""

    function_names = (_F + "interpolate", _F + "upsample", _F + "upsample_nearest",
                      _F + "upsample_bilinear")


@register_op_type
class PadOp(FunctionalOp):
    """``F.pad`` on trailing axes."""

    function_names = (_F + "pad", "torch.constant_pad_nd")
